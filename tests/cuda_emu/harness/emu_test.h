// Test support for the emulated CUDA kernels: guarded tensors with any row stride and offset,
// a fault-checking kernel call, float64 comparisons, and the suite registry.
//
// A suite (one per kernel family, in case_*.cpp) calls the miss_ext::cuda:: launcher through
// emu_test::call() and compares the result with a float64 formula through emu_test::check().
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/kernels.h"
#include "common/philox.h"

namespace emu_test {

using at::ScalarType;
using at::Tensor;

// The dtypes a suite runs: all four, or those of `harness run --dtypes=...`.
inline std::vector<ScalarType> dtype_filter;
inline std::vector<ScalarType> pick(const std::vector<ScalarType>& all) {
  std::vector<ScalarType> out;
  for (ScalarType t : all)
    if (dtype_filter.empty() || std::find(dtype_filter.begin(), dtype_filter.end(), t) != dtype_filter.end())
      out.push_back(t);
  return out;
}
inline std::vector<ScalarType> dtypes() { return pick({at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}); }
inline std::vector<ScalarType> half_dtypes() { return pick({at::kHalf, at::kBFloat16}); }

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return "int64";
  }
}

// ---------------------------------------------------------------------------- counters
struct Stats {
  long long checks = 0, failures = 0;
};
inline Stats stats;

// Uniform in [-sqrt(3), sqrt(3)) (unit variance), from a fixed-seed xorshift64*: test inputs
// are the same on every run and machine.
inline uint64_t rng_state = 0x2545F4914F6CDD1Dull;
inline double random_value() {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (static_cast<double>((rng_state * 0x2545F4914F6CDD1Dull) >> 11) * 0x1p-52 - 1.0) * 1.7320508075688772;
}

// While set (by the selftest, which expects failures), failures are collected here instead.
inline std::vector<std::string>* captured_failures = nullptr;

inline void report_failure(const std::string& what) {
  ++stats.failures;
  if (captured_failures) {
    captured_failures->push_back(what);
    return;
  }
  printf("FAIL %s\n", what.c_str());
  fflush(stdout);
}

// ---------------------------------------------------------------------------- elements
// Element `i` counted from data_ptr(), as double; storing v rounded to t's dtype.
inline double get(const Tensor& t, int64_t i) { return at::element(t, i); }
inline void set(Tensor& t, int64_t i, double v) { at::set_element(t, i, v); }
// v rounded to dtype dt, as a double.
inline double round_to(ScalarType dt, double v) {
  Tensor t = at::empty({1}, at::TensorOptions().dtype(dt));
  set(t, 0, v);
  return get(t, 0);
}
// Offset from data_ptr() of logical element `e` (row-major over t's sizes).
inline int64_t elem_offset(const Tensor& t, int64_t e) { return at::offset_of(t, e); }

// The logical values of t, row-major, as doubles.
inline std::vector<double> values(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t e = 0; e < t.numel(); ++e) v[e] = get(t, elem_offset(t, e));
  return v;
}

// Dtypes a kernel may widen `from` into (kernels.h: float32 holds the half types, float64 all).
inline std::vector<ScalarType> wider_than(ScalarType from) {
  std::vector<ScalarType> w;
  if (from == at::kHalf || from == at::kBFloat16) w.push_back(at::kFloat);
  if (from != at::kDouble) w.push_back(at::kDouble);
  return w;
}

// ---------------------------------------------------------------------------- tensors
// A tensor of `sizes` in a fresh guarded buffer: rows `ld` elements apart (ld >= last size;
// -1: packed) and the first element `off` elements into the buffer. Everything outside the
// view stays poison (NaN). `scale` > 0 fills the view with random values of that standard
// deviation; 0 leaves it poisoned (an output).
inline Tensor make(ScalarType dt, std::vector<int64_t> sizes, double scale = 1.0, int64_t ld = -1, int64_t off = 0) {
  Tensor t;
  t.dt = dt;
  t.sz = sizes;
  t.sd.assign(sizes.size(), 1);
  const int64_t last = sizes.empty() ? 1 : sizes.back();
  if (ld < 0) ld = last;
  int64_t s = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    t.sd[d] = s;
    s *= d == static_cast<int64_t>(sizes.size()) - 1 ? ld : sizes[d];
  }
  t.off = off;
  int64_t need = off;  // elements the buffer must hold
  if (t.numel() > 0) {
    need += 1;
    for (size_t d = 0; d < sizes.size(); ++d) need += (sizes[d] - 1) * t.sd[d];
  }
  t.buf = std::make_shared<emu::Buffer>(static_cast<size_t>(std::max<int64_t>(need, 0)) * c10::elementSize(dt));
  if (scale > 0) {
    for (int64_t e = 0; e < t.numel(); ++e) set(t, elem_offset(t, e), scale * random_value());
  }
  return t;
}
inline Tensor poisoned(ScalarType dt, std::vector<int64_t> sizes, int64_t off = 0) { return make(dt, sizes, 0.0, -1, off); }

// ---------------------------------------------------------------------------- device
// The device the launchers see (SM count decides grid sizes and splits; major >= 8 allows WMMA).
struct Device {
  int sms = 132, major = 9;
};
inline Device default_device;
struct WithDevice {  // RAII: run a few cases on another device
  at::cuda::DeviceProp saved = at::cuda::device_prop;
  explicit WithDevice(Device d) {
    at::cuda::device_prop.multiProcessorCount = d.sms;
    at::cuda::device_prop.major = d.major;
  }
  ~WithDevice() { at::cuda::device_prop = saved; }
};
inline std::string device_tag() {
  const auto& p = at::cuda::device_prop;
  if (p.multiProcessorCount == default_device.sms && p.major == default_device.major) return "";
  return " [sms=" + std::to_string(p.multiProcessorCount) + " sm_" + std::to_string(p.major) + "x]";
}

// ---------------------------------------------------------------------------- calls
// Runs a kernel launcher and checks what it must not do: an emulator error (see emu_cuda.h),
// an exception, a write into any input, a write into an output's buffer outside its view,
// a write into any guard zone. Returns false (after reporting) when something went wrong.
struct Snapshot {
  const Tensor* t;
  std::vector<unsigned char> bytes;
};
inline bool call(const std::string& name, std::vector<const Tensor*> inputs, std::vector<const Tensor*> outputs,
                 const std::function<void()>& launcher) {
  std::vector<Snapshot> before;
  for (auto* t : inputs)
    if (t->defined()) before.push_back({t, {t->buf->base, t->buf->base + t->buf->total()}});
  for (auto* t : outputs) before.push_back({t, {t->buf->base, t->buf->base + t->buf->total()}});
  std::string err;
  emu::in_kernel_call = true;
  try {
    launcher();
  } catch (const std::exception& e) {
    err = e.what();
  }
  emu::in_kernel_call = false;
  if (emu::has_error()) err = emu::take_error();  // the emulator's own message is the precise one
  if (err.empty()) {
    for (size_t k = 0; k < before.size() && err.empty(); ++k) {
      const Tensor& t = *before[k].t;
      const bool is_out = k >= before.size() - outputs.size();
      std::vector<bool> in_view;
      if (is_out) {
        in_view.assign(t.buf->total(), false);
        const size_t es = t.element_size();
        for (int64_t e = 0; e < t.numel(); ++e) {
          const size_t at = emu::Buffer::kGuard + (t.off + elem_offset(t, e)) * es;
          for (size_t b = 0; b < es; ++b) in_view[at + b] = true;
        }
      }
      for (size_t b = 0; b < t.buf->total(); ++b) {
        if (t.buf->base[b] != before[k].bytes[b] && !(is_out && in_view[b])) {
          const long long rel = static_cast<long long>(b) - static_cast<long long>(emu::Buffer::kGuard);
          err = std::string(is_out ? "wrote outside its output's view" : "wrote into an input") + " (byte " +
                std::to_string(rel) + " of a " + std::to_string(t.buf->bytes) + " B buffer" +
                (rel < 0 || rel >= static_cast<long long>(t.buf->bytes) ? ", in its guard zone)" : ")");
          break;
        }
      }
    }
  }
  if (!err.empty()) {
    ++stats.checks;
    report_failure(name + device_tag() + ": " + err);
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------- checks
// Rounding unit of a dtype, and of the fp32/fp64 accumulation.
inline double unit(ScalarType dt) {
  switch (dt) {
    case at::kFloat: return 0x1p-24;
    case at::kDouble: return 0x1p-53;
    case at::kHalf: return 0x1p-11;
    default: return 0x1p-8;
  }
}
inline double acc_unit(ScalarType dt) { return dt == at::kDouble ? 0x1p-53 : 0x1p-24; }

// Compares out (any layout) with ref, element by element. The tolerance allows the output's
// rounding (2 units of |ref|) plus the accumulation's (64 units of the sum of |terms|, `mag`);
// `precision`: the dtype the kernel computes in when coarser than out's (a float32 block's
// products written to a float64 output). exact: bit-for-bit equal values (ref must then
// already be rounded like the kernel).
inline void check(const std::string& name, const Tensor& out, const std::vector<double>& ref,
                  const std::vector<double>& mag, bool exact = false,
                  ScalarType precision = ScalarType::Undefined) {
  ++stats.checks;
  const std::vector<double> got = values(out);
  const ScalarType p = precision == ScalarType::Undefined ? out.dt : precision;
  const double out_unit = std::max(unit(out.dt), unit(p)), sum_unit = std::max(acc_unit(out.dt), acc_unit(p));
  int64_t bad = 0, first = -1;
  double worst = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(ref.size()); ++i) {
    const double tol = exact ? 0.0
                             : 2 * out_unit * std::fabs(ref[i]) + 64 * sum_unit * mag[i] +
                                   (out.dt == at::kHalf ? 0x1p-24 : 0.0);  // fp16 subnormals
    const double err = std::fabs(got[i] - ref[i]);
    if (!(err <= tol)) {  // NaN (an unwritten element) fails too
      if (first < 0) first = i;
      ++bad;
      if (!(err <= worst)) worst = err;
    }
  }
  if (bad) {
    char msg[256];
    snprintf(msg, sizeof msg, ": %lld of %zu elements wrong, first [%lld]: got %.9g want %.9g (worst error %.3g)",
             static_cast<long long>(bad), ref.size(), static_cast<long long>(first), got[first], ref[first], worst);
    report_failure(name + device_tag() + msg);
  }
}

// Runs fn, which must produce at least one failure whose message contains `expect` (a planted
// fault, or arguments a launcher must refuse); those failures are expected and not counted.
inline void expect_caught(const std::string& what, const std::string& expect, const std::function<void()>& fn) {
  std::vector<std::string> got;
  const Stats saved = stats;
  captured_failures = &got;
  fn();
  captured_failures = nullptr;
  stats = saved;
  ++stats.checks;
  for (const std::string& m : got) {
    if (m.find(expect) != std::string::npos) {
      printf("caught %-22s %s\n", what.c_str(), m.c_str());
      return;
    }
  }
  report_failure("'" + what + "' was not caught (expected a failure mentioning '" + expect + "'" +
                 (got.empty() ? std::string(", got none)") : ", got: " + got[0] + ")"));
}

// "op float32 (2,3,4) extra" for messages.
inline std::string label(const char* op, ScalarType dt, std::vector<int64_t> dims, const std::string& extra = "") {
  std::string s = std::string(op) + " " + dtype_name(dt) + " (";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + ")" + (extra.empty() ? "" : " " + extra);
}

// Dropout helpers shared by the cases: the mask of logical element idx, as in philox.h.
inline miss_ext::DropoutArgs dropout(double p, uint64_t seed) {
  miss_ext::DropoutArgs d;
  d.enabled = p > 0;
  d.p = p;
  d.seed = seed;
  return d;
}
inline bool kept(const miss_ext::DropoutArgs& d, uint64_t idx) {
  if (!d.enabled) return true;
  return miss_ext::dropout_keep(miss_ext::philox4x32_10(d.seed, idx >> 2).v[idx & 3], miss_ext::dropout_threshold(d.p));
}

// ---------------------------------------------------------------------------- registry
struct Suite {
  std::string name, help;
  std::function<void()> run;
};
inline std::vector<Suite>& suites() {
  static std::vector<Suite> s;
  return s;
}
struct RegisterSuite {
  RegisterSuite(const char* name, const char* help, std::function<void()> fn) { suites().push_back({name, help, fn}); }
};
#define EMU_CAT2(a, b) a##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
// EMU_SUITE(name, "what it covers") { body }
#define EMU_SUITE(NAME, HELP)                                                                      \
  static void emu_suite_##NAME();                                                                  \
  static ::emu_test::RegisterSuite EMU_CAT(emu_register_, NAME)(#NAME, HELP, emu_suite_##NAME);    \
  static void emu_suite_##NAME()

}  // namespace emu_test
