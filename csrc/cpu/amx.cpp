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
#include <vector>

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

#ifdef MISS_EXT_HAVE_TORCH_BRGEMM_F32
void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  torch_brgemm::gemm_f32(m, n, k, lda, ldb, ldc, accumulate, a, b, c);
}
#endif

#else  // this torch's brgemm did not pass setup.py's probe: available() is false, callers fall back

void gemm(int64_t, const bf16*, int64_t, const Panels&, int64_t, int64_t, float*, int64_t, bool, int64_t) {
  TORCH_CHECK(false, "miss_ext internal: amx::gemm called in a build without torch's brgemm");
}

void release() {}

#endif

#ifndef MISS_EXT_HAVE_TORCH_BRGEMM_F32
void gemm_f32(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) {
  TORCH_CHECK(false, "miss_ext internal: amx::gemm_f32 called in a build without torch's fp32 brgemm");
}
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

// An fp32 product with odd sizes (M 7, K 33, N 40: tails everywhere) and strided A and B against
// a double reference; fp32 rounding only, so a loose relative bound tells right from wrong.
bool probe_fp32() {
#ifndef MISS_EXT_HAVE_TORCH_BRGEMM_F32
  return false;
#else
  try {
    constexpr int64_t M = 7, K = 33, N = 40, lda = 35, ldb = 48, ldc = 44;
    std::vector<float> a(M * lda), b(K * ldb), c(M * ldc, 0.5f);
    for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 13) * 0.37f - 2.0f;
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i % 11) * 0.29f - 1.3f;
    for (int pass = 0; pass < 2; ++pass) {  // the second accumulates onto the first
      gemm_f32(M, N, K, a.data(), lda, b.data(), ldb, c.data(), ldc, pass == 1);
    }
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t n = 0; n < N; ++n) {
        double want = 0.0;
        for (int64_t k = 0; k < K; ++k) want += static_cast<double>(a[i * lda + k]) * b[k * ldb + n];
        if (std::abs(2.0 * want - c[i * ldc + n]) > 1e-4 * (1.0 + std::abs(want))) return false;
      }
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
#endif
}

}  // namespace

bool tiles() {
#ifdef MISS_EXT_HAVE_TORCH_BRGEMM
  static const bool result = torch_brgemm::could_pack();
  return result;
#else
  return false;
#endif
}

bool fp32_available() {
  static const bool result = available() && probe_fp32();
  return result;
}

const std::string& status() {
  static const std::string result = probe();
  return result;
}

bool available() { return status() == "active"; }

}  // namespace amx
}  // namespace cpu
}  // namespace miss_ext
