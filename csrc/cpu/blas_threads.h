// Vendor GEMMs inside a kernel's own parallel tasks run single-threaded.
//
// MKL (torch's CPU BLAS on x86) splits the K dimension of skinny products (K >= ~1024) across
// threads even when called from inside an OpenMP parallel region, so the bits of such a product
// depend on the thread count. A kernel whose partial products are summed in a fixed order must
// run each product sequentially to keep its result independent of the thread count; its tasks
// are its parallelism anyway. Other BLAS libraries are left alone (none found that does this).
#pragma once

namespace miss_ext {
namespace cpu {

class SequentialBlas {
 public:
  SequentialBlas();
  ~SequentialBlas();
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_ = 0;
  bool active_ = false;
};

}  // namespace cpu
}  // namespace miss_ext
