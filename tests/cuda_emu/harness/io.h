// File mode of the harness: run the emulated kernels on inputs written by a test, so the test
// can compare them with the real CPU operators (tests/test_cuda_emulation.py).
//
// A manifest has one kernel call per line: the op name, then key=value pairs; a tensor value
// is @PATH:DTYPE:D0,D1,...[:LD[:OFF]] (raw row-major bytes of the logical tensor; the harness
// places them with row stride LD and storage offset OFF in a guarded, poisoned buffer).
// `out=PATH` receives the raw bytes of the result. Ops are registered with EMU_IO_OP in io_ops.cpp.
#pragma once

#include <functional>
#include <map>
#include <string>

#include "emu_test.h"

namespace emu_test {

class IoCase {
 public:
  std::string line;
  std::map<std::string, std::string> kv;

  bool has(const std::string& key) const { return kv.count(key) > 0; }
  const std::string& str(const std::string& key) const;
  double num(const std::string& key) const { return std::stod(str(key)); }
  int64_t integer(const std::string& key) const { return std::stoll(str(key)); }
  // A torch int64 seed, as the CPU front end reads it: static_cast<uint64_t>(seed.item<int64_t>()).
  uint64_t seed(const std::string& key) const { return static_cast<uint64_t>(integer(key)); }
  Tensor in(const std::string& key);  // loads and places a tensor
  // Runs the launcher under emu_test::call (fault checks); false when it failed.
  bool run(std::vector<const Tensor*> inputs, const Tensor& out, const std::function<void()>& launcher) {
    return call(line, std::move(inputs), {&out}, launcher);
  }
};

using IoOp = std::function<Tensor(IoCase&)>;  // an undefined Tensor: the call failed (reported)
inline std::map<std::string, IoOp>& io_ops() {
  static std::map<std::string, IoOp> m;
  return m;
}
struct RegisterIoOp {
  RegisterIoOp(const char* name, IoOp op) { io_ops()[name] = std::move(op); }
};
// EMU_IO_OP(name) { ... return out; }   with `IoCase& c` in scope
#define EMU_IO_OP(NAME)                                                                  \
  static at::Tensor emu_io_##NAME(::emu_test::IoCase& c);                                \
  static ::emu_test::RegisterIoOp EMU_CAT(emu_io_register_, NAME)(#NAME, emu_io_##NAME); \
  static at::Tensor emu_io_##NAME(::emu_test::IoCase& c)

int run_manifest(const std::string& path);

}  // namespace emu_test
