#include "cpu/amx.h"

#include "cpu/vec.h"
#include "cpu/workspace.h"

#ifdef MISS_EXT_HAVE_TORCH_BRGEMM
#include "cpu/torch_brgemm.h"
#endif

#include <cmath>
#include <cstdlib>
#include <exception>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

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

#ifdef MISS_EXT_HAVE_TORCH_BRGEMM

void gemm(int64_t m, const bf16* a, int64_t lda, const Panels& b, int64_t p0, int64_t p1,
          float* c, int64_t ldc, bool accumulate, int64_t col0) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t w = b.width(p);
    torch_brgemm::gemm(m, w, b.kp(), lda, w, ldc, accumulate, a, b.panel(p), c + (b.start(p) - col0));
  }
}

void release() { torch_brgemm::release(); }

#else  // this torch's brgemm did not pass setup.py's probe: available() is false, callers fall back

void gemm(int64_t, const bf16*, int64_t, const Panels&, int64_t, int64_t, float*, int64_t, bool, int64_t) {
  TORCH_CHECK(false, "miss_ext internal: amx::gemm called in a build without torch's brgemm");
}

void release() {}

#endif

namespace {

// CPUID leaf 7, sub-leaf 1, EAX bit 5; the OS's AVX-512 state is oneDNN's to check (it refuses
// the kernel otherwise, which the self-test below turns into "off").
bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
  return (eax >> 5) & 1u;
#else
  return false;
#endif
}

// One small product with an odd K and a 48-wide tail panel against a double reference: the
// kernel must exist, accept this packing and be exact to fp32 rounding.
const char* probe() {
#ifndef MISS_EXT_HAVE_TORCH_BRGEMM
  return "not compiled: this torch's brgemm failed setup.py's build probe";
#else
  const char* env = std::getenv("MISS_EXT_CPU_BRGEMM");
  if (env && std::string(env) == "0") return "off: MISS_EXT_CPU_BRGEMM=0";
  try {
    // torch's could_pack() is true only with AMX; on AVX512-BF16 the micro-kernel also takes the
    // VNNI-packed B (measured on a Zen 4: 200+ GFLOP/s a core, 2.5x an fp32 GEMM). Without either,
    // oneDNN would emulate bf16, so the fp32 fallbacks stay.
    if (!torch_brgemm::could_pack() && !cpu_has_avx512_bf16())
      return "off: this CPU has neither AMX nor AVX512-BF16";
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
        if (std::abs(want - c[i * N + n]) > 1e-3) return "off: the self-test gave wrong results";  // small integers: exact
      }
    }
    return "active";
  } catch (const std::exception&) {
    return "off: the self-test raised an error";
  }
#endif
}

}  // namespace

const std::string& status() {
  static const std::string result = probe();
  return result;
}

bool available() { return status() == "active"; }

}  // namespace amx
}  // namespace cpu
}  // namespace miss_ext
