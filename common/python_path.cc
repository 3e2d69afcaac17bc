#include "common/python_path.h"

#include <filesystem>
#include <system_error>

namespace muster {
namespace {

namespace fs = std::filesystem;

bool HoldsPackage(const fs::path& dir) {
  std::error_code ec;
  return !dir.empty() && fs::exists(dir / "muster" / "__init__.py", ec);
}

}  // namespace

std::string MusterPythonDir() {
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    fs::path candidate = exe.parent_path().parent_path() / "python";
    if (HoldsPackage(candidate)) return candidate.string();
  }
#ifdef MUSTER_BUILD_PYTHON_DIR
  if (HoldsPackage(MUSTER_BUILD_PYTHON_DIR)) return MUSTER_BUILD_PYTHON_DIR;
#endif
  return {};
}

void AddMusterPythonPath(std::map<std::string, std::string>& env) {
  std::string dir = MusterPythonDir();
  if (dir.empty()) return;
  std::string& path = env["PYTHONPATH"];
  // Already first or somewhere in the list: leave the user's order alone.
  std::string padded = ":" + path + ":";
  if (padded.find(":" + dir + ":") != std::string::npos) return;
  path = path.empty() ? dir : dir + ":" + path;
}

void AddMusterPythonPath(const std::vector<std::string>& inherited,
                         std::map<std::string, std::string>& overrides) {
  if (MusterPythonDir().empty()) return;
  if (!overrides.count("PYTHONPATH")) {
    for (const auto& kv : inherited) {
      if (kv.rfind("PYTHONPATH=", 0) == 0) overrides["PYTHONPATH"] = kv.substr(11);
    }
  }
  AddMusterPythonPath(overrides);
}

}  // namespace muster
