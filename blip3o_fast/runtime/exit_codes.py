"""The exit codes of every command, one home (docs/architecture.md §4.4; the README's table lists them).

A job script branches on them: requeue on STOPPED, fix the config on USER_ERROR, lower the LR on
NONFINITE, report CRASH. Under torchrun or the deepspeed launcher the launcher's own code is 1 whenever a
rank's is not 0 (the ranks' codes are in its failure summary); under srun the task's code is srun's.
"""

OK = 0  # done: the last step was reached (checkpoint written)
CRASH = 1  # an unexpected exception: a bug, printed with its traceback
USER_ERROR = 2  # bad config, data, arguments or build: one line says what to change
NONFINITE = 3  # train.max_nonfinite steps in a row were non-finite; a checkpoint of the last good weights was saved
RANK_LOST = 4  # another rank died or stopped answering; resume from the newest complete checkpoint
STOPPED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint: resumable, requeue (sysexits' EX_TEMPFAIL)
INTERRUPTED = 130  # a second Ctrl-C: stopped at once, no checkpoint

TABLE = (
    (OK, "done: the last step was reached"),
    (CRASH, "crash: an unexpected exception (a bug), with its traceback"),
    (USER_ERROR, "user error: one line names the problem and the fix"),
    (NONFINITE, "too many non-finite steps in a row; the last good weights are checkpointed"),
    (RANK_LOST, "another rank died or stopped answering; rerun to resume from the newest complete checkpoint"),
    (STOPPED, "stopped by SIGTERM/SIGINT after a checkpoint: resumable, a job script requeues on it"),
    (INTERRUPTED, "a second Ctrl-C: stopped at once, without a checkpoint"),
)
