// Importing blip3o_fast._C loads the library and runs its op registrations; the module itself has no
// Python functions. Kept apart from ops.cpp so the CMake build (C++ tests) needs no Python.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
