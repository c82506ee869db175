// Manifest parsing and tensor files for the harness's file mode (see io.h).
#include "io.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace emu_test {
namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep)) parts.push_back(part);
  return parts;
}

ScalarType parse_dtype(const std::string& s) {
  if (s == "float32") return at::kFloat;
  if (s == "float64") return at::kDouble;
  if (s == "float16") return at::kHalf;
  if (s == "bfloat16") return at::kBFloat16;
  throw std::runtime_error("unknown dtype " + s);
}

}  // namespace

const std::string& IoCase::str(const std::string& key) const {
  auto it = kv.find(key);
  if (it == kv.end()) throw std::runtime_error("missing key '" + key + "'");
  return it->second;
}

Tensor IoCase::in(const std::string& key) {
  const std::string& spec = str(key);
  if (spec.empty() || spec[0] != '@') throw std::runtime_error(key + ": not a tensor (@PATH:DTYPE:DIMS[:LD[:OFF]])");
  const std::vector<std::string> f = split(spec.substr(1), ':');
  if (f.size() < 3) throw std::runtime_error(key + ": want @PATH:DTYPE:DIMS[:LD[:OFF]]");
  std::vector<int64_t> dims;
  for (const std::string& d : split(f[2], ',')) dims.push_back(std::stoll(d));
  const int64_t ld = f.size() > 3 ? std::stoll(f[3]) : -1;
  const int64_t off = f.size() > 4 ? std::stoll(f[4]) : 0;
  Tensor t = make(parse_dtype(f[1]), dims, 0.0, ld, off);
  const size_t es = t.element_size();
  std::ifstream file(f[0], std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (raw.size() != static_cast<size_t>(t.numel()) * es)
    throw std::runtime_error(key + ": " + f[0] + " holds " + std::to_string(raw.size()) + " bytes, want " +
                             std::to_string(t.numel() * es));
  for (int64_t e = 0; e < t.numel(); ++e)
    memcpy(static_cast<char*>(t.data_ptr()) + elem_offset(t, e) * es, raw.data() + e * es, es);
  return t;
}

int run_manifest(const std::string& path) {
  std::ifstream manifest(path);
  if (!manifest) {
    fprintf(stderr, "cannot read %s\n", path.c_str());
    return 2;
  }
  std::string line;
  int cases = 0;
  while (std::getline(manifest, line)) {
    if (line.empty() || line[0] == '#') continue;
    ++cases;
    IoCase c;
    c.line = line;
    const std::vector<std::string> words = split(line, ' ');
    for (size_t i = 1; i < words.size(); ++i) {
      const size_t eq = words[i].find('=');
      if (eq != std::string::npos) c.kv[words[i].substr(0, eq)] = words[i].substr(eq + 1);
    }
    auto op = io_ops().find(words[0]);
    if (op == io_ops().end()) {
      ++stats.checks;
      report_failure(line + ": no such op (register it with EMU_IO_OP in io_ops.cpp)");
      continue;
    }
    try {
      Tensor out = op->second(c);
      if (!out.defined()) continue;  // failed and reported by IoCase::run
      ++stats.checks;
      // Outputs are made packed, so the view is one run of bytes.
      std::ofstream o(c.str("out"), std::ios::binary);
      o.write(static_cast<const char*>(out.data_ptr()), static_cast<std::streamsize>(out.numel() * out.element_size()));
    } catch (const std::exception& e) {
      ++stats.checks;
      report_failure(line + ": " + e.what());
    }
  }
  printf("io: %d cases\n", cases);
  return 0;
}

}  // namespace emu_test
