// The emulation harness's command line.
//
//   harness list                          the suites
//   harness run [SUITE...] [options]      run suites (default: every suite but the selftest)
//       --threads=forward|reverse|shuffle thread resume order between barriers (shuffle)
//       --blocks=forward|reverse|shuffle  block order within a launch (shuffle)
//       --seed=N                          seed of the shuffles (1)
//       --dtypes=float32,bfloat16,...     only these dtypes (all four)
//       --coverage=PATH                   write "launches<TAB>kernel instantiation" lines
//   harness io MANIFEST                   file mode (io.h)
// Prints one FAIL line per failed check and a summary; exit status 1 when anything failed.
#include <chrono>
#include <fstream>

#include "io.h"

namespace {

bool parse_order(const std::string& v, emu::Order& o) {
  if (v == "forward") o = emu::Order::kForward;
  else if (v == "reverse") o = emu::Order::kReverse;
  else if (v == "shuffle") o = emu::Order::kShuffle;
  else return false;
  return true;
}

int usage() {
  fprintf(stderr, "usage: harness list | run [SUITE...] [--threads=O] [--blocks=O] [--seed=N] [--dtypes=D,...] [--coverage=PATH] | io MANIFEST\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace emu_test;
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 2) return usage();
  const std::string cmd = argv[1];
  if (cmd == "list") {
    for (const Suite& s : suites()) printf("%-24s %s\n", s.name.c_str(), s.help.c_str());
    return 0;
  }
  std::vector<std::string> names;
  std::string coverage;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--threads=", 0) == 0) {
      if (!parse_order(a.substr(10), emu::options.threads)) return usage();
    } else if (a.rfind("--blocks=", 0) == 0) {
      if (!parse_order(a.substr(9), emu::options.blocks)) return usage();
    } else if (a.rfind("--seed=", 0) == 0) {
      emu::options.seed = std::stoull(a.substr(7));
    } else if (a.rfind("--dtypes=", 0) == 0) {
      std::string list = a.substr(9) + ",";
      for (size_t b = 0, e; (e = list.find(',', b)) != std::string::npos; b = e + 1) {
        const std::string d = list.substr(b, e - b);
        bool found = false;
        for (ScalarType t : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16})
          if (d == dtype_name(t)) dtype_filter.push_back(t), found = true;
        if (!found) return usage();
      }
    } else if (a.rfind("--coverage=", 0) == 0) {
      coverage = a.substr(11);
    } else if (a.rfind("--", 0) == 0) {
      return usage();
    } else {
      names.push_back(a);
    }
  }
  emu::rng.seed(emu::options.seed);
  const auto t0 = std::chrono::steady_clock::now();
  if (cmd == "io") {
    if (names.size() != 1) return usage();
    const int rc = run_manifest(names[0]);
    if (rc) return rc;
  } else if (cmd == "run") {
    std::vector<const Suite*> chosen;
    for (const Suite& s : suites())
      if (names.empty() ? s.name.rfind("selftest", 0) != 0 : std::find(names.begin(), names.end(), s.name) != names.end())
        chosen.push_back(&s);
    for (const std::string& n : names) {
      if (std::none_of(suites().begin(), suites().end(), [&](const Suite& s) { return s.name == n; })) {
        fprintf(stderr, "no suite '%s' (harness list)\n", n.c_str());
        return 2;
      }
    }
    for (const Suite* s : chosen) {
      const auto s0 = std::chrono::steady_clock::now();
      const long long f0 = stats.failures, c0 = stats.checks;
      s->run();
      printf("suite %s: %lld checks, %lld failures, %.2f s\n", s->name.c_str(), stats.checks - c0,
             stats.failures - f0, std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count());
    }
  } else {
    return usage();
  }
  int launched = 0;
  for (const auto& site : emu::sites()) launched += site.launches > 0;
  if (!coverage.empty()) {
    std::ofstream o(coverage);
    for (const auto& site : emu::sites()) o << site.launches << '\t' << site.name << '\n';
  }
  printf("emu: %lld checks, %lld failures, %lld launches, %lld barrier waits, %d of %zu kernel instantiations launched, %.1f s\n",
         stats.checks, stats.failures, emu::launches, emu::barriers, launched, emu::sites().size(),
         std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return stats.failures ? 1 : 0;
}
