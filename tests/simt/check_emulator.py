"""The emulator's own checks fire: each planted break of the CUDA execution model is an error that
names the kernel, the block and the thread (csrc/simt/selftest.cpp); a correct kernel passes."""

from __future__ import annotations

import pytest
import torch

simt = torch.ops.blip3o_fast_simt


def test_correct_block_reduction_passes_every_schedule():
    assert simt.selftest("ok") == pytest.approx(sum(range(1000, 2000)))  # block 1's slice


def test_missing_barrier_is_a_schedule_dependent_result():
    with pytest.raises(RuntimeError, match=r"differs between the in-order and \w+ thread schedules.*block_sum_kernel"):
        simt.selftest("missing_barrier")


def test_divergent_shuffle():
    with pytest.raises(RuntimeError, match=r"__shfl_xor_sync with mask 0xffffffff was reached by lanes 0xffffff7f of "
                                           r"warp 0 only .*lane 7 exited; kernel divergent_kernel, block \(0,0,0\), "
                                           r"thread \(7,0,0\)"):
        simt.selftest("divergent_shuffle")


def test_barrier_reached_by_part_of_the_block():
    with pytest.raises(RuntimeError, match=r"__syncthreads\(\) reached by only part of the block.*40 threads wait, "
                                           r"first kernel divergent_kernel, block \(0,0,0\), thread \(0,0,0\); "
                                           r"24 exited, first thread \(40,0,0\)"):
        simt.selftest("partial_barrier")


def test_half_a_warp_at_a_barrier_the_other_half_at_a_shuffle():
    with pytest.raises(RuntimeError, match=r"was reached by lanes 0xffff0000 of warp 0 only.*lane 0 waits at "
                                           r"__syncthreads\(\)"):
        simt.selftest("mixed")


def test_launch_limits():
    with pytest.raises(RuntimeError, match=r"block_sum_kernel: invalid configuration \(grid 1x65536x1.*grid.y and "
                                           r"grid.z are at most 65535"):
        simt.selftest("grid_y")
    with pytest.raises(RuntimeError, match=r"more dynamic shared memory than the kernel may use \(49152\)"):
        simt.selftest("smem_limit")
