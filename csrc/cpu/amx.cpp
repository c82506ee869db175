#include "cpu/amx.h"

#include "cpu/vec.h"
#include "cpu/workspace.h"

#include "cpu/vec.h"

#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdlib>
#include <exception>
#include <string>

namespace miss_ext {
namespace cpu {
namespace amx {

void Panels::reset(int64_t k, int64_t n) {
  TORCH_CHECK(width_ok(n), "miss_ext internal: packed panels need a multiple of 16 columns");
  k_ = k;
  kp_ = padded_k(k);
  n_ = n;
  // at::empty's CPU allocator aligns to 64 bytes; every panel is a multiple of 64 bytes long.
  if (!storage_.defined() || storage_.numel() < kp_ * n_) {
    storage_ = workspace_empty({kp_ * n_}, at::kBFloat16);
  }
  data_ = storage_.data_ptr<bf16>();
}

void Panels::pack_pair(int64_t k, const bf16* r0, const bf16* r1) {
  vec::interleave_panels_bf16(reinterpret_cast<const uint16_t*>(r0), reinterpret_cast<const uint16_t*>(r1),
                              n_, kPanel, kp_, k, reinterpret_cast<uint16_t*>(data_));
}

void gemm(int64_t m, const bf16* a, int64_t lda, const Panels& b, int64_t p0, int64_t p1,
          float* c, int64_t ldc, bool accumulate, int64_t col0) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t w = b.width(p);
    at::native::cpublas::brgemm(m, w, b.kp(), lda, w, ldc, accumulate, a, b.panel(p),
                                c + (b.start(p) - col0), /*is_vnni=*/true);
  }
}

void release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

namespace {

// One small product with an odd K and a 48-wide tail panel against a double reference: the
// kernel must exist, accept this packing and be exact to fp32 rounding.
bool probe() {
  const char* env = std::getenv("MISS_EXT_CPU_BRGEMM");
  if (env && std::string(env) == "0") return false;
  try {
    if (!at::native::cpublas::could_pack(at::kBFloat16)) return false;
    constexpr int64_t M = 24, K = 37, N = 112;
    std::vector<bf16> a(M * padded_k(K)), bm(K * N);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t k = 0; k < padded_k(K); ++k)
        a[i * padded_k(K) + k] = k < K ? bf16(static_cast<float>((i * 7 + k * 3) % 11) - 5.0f) : bf16(0.0f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) bm[k * N + n] = bf16(static_cast<float>((k * 5 + n) % 13) * 0.25f - 1.5f);
    Panels b(K, N);
    b.pack_rows(0, b.kp(), [&](int64_t k) { return bm.data() + k * N; });
    std::vector<float> c(M * N, -1.0f);
    gemm(M, a.data(), padded_k(K), b, 0, b.count(), c.data(), N, false);
    release();
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t n = 0; n < N; ++n) {
        double want = 0.0;
        for (int64_t k = 0; k < K; ++k)
          want += static_cast<double>(float(a[i * padded_k(K) + k])) * static_cast<double>(float(bm[k * N + n]));
        if (std::abs(want - c[i * N + n]) > 1e-3) return false;  // small integers: exact
      }
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

bool available() {
  static const bool ok = probe();
  return ok;
}

}  // namespace amx
}  // namespace cpu
}  // namespace miss_ext
