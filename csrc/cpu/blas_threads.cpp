#include "cpu/blas_threads.h"

#include <dlfcn.h>

namespace miss_ext {
namespace cpu {
namespace {

using SetLocal = int (*)(int);

// MKL's thread-local thread count setter, when torch's BLAS is MKL (libtorch_cpu exports it).
// Python loads torch's libraries with local symbol scope, so look in libtorch_cpu itself too.
SetLocal find_mkl_set_local() {
  const char* name = "MKL_Set_Num_Threads_Local";
  if (void* fn = dlsym(RTLD_DEFAULT, name)) return reinterpret_cast<SetLocal>(fn);
  if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
    void* fn = dlsym(lib, name);
    dlclose(lib);  // drops only the reference RTLD_NOLOAD added
    return reinterpret_cast<SetLocal>(fn);
  }
  return nullptr;
}

SetLocal mkl_set_local() {
  static const SetLocal fn = find_mkl_set_local();
  return fn;
}

}  // namespace

SequentialBlas::SequentialBlas() {
  if (SetLocal fn = mkl_set_local()) {
    previous_ = fn(1);
    active_ = true;
  }
}

SequentialBlas::~SequentialBlas() {
  if (active_) mkl_set_local()(previous_);
}

}  // namespace cpu
}  // namespace miss_ext
