#pragma once

// Where the `muster` Python package lives, so that every rank muster starts can `import muster`
// with nothing installed: the launcher (`muster run`) and the node agent prepend this directory
// to the ranks' PYTHONPATH.
//
// Why PYTHONPATH from the starter rather than a site-packages install or a .pth file: the ranks
// run whatever python3 the user names (Debian's, a venv's), and a package dir on PYTHONPATH is
// seen by all of them; it needs no root and no install step, and it always matches the muster
// binary that started the rank (a stale installed copy could not).
//
// The directory is found relative to the running binary (/proc/self/exe): `<bin>/../python`
// holds `muster/__init__.py` in the build tree (build/bin/muster, build/python/muster). Binaries
// that are not in bin/ (tests, benchmarks) fall back to the build tree this file was compiled
// in.
//
// Thread-safety: pure functions.

#include <map>
#include <string>
#include <vector>

namespace muster {

// The directory that holds the `muster` package, or empty when none is found.
std::string MusterPythonDir();

// Prepends MusterPythonDir() to env["PYTHONPATH"] (kept after it), unless it is already there
// or no package was found.
void AddMusterPythonPath(std::map<std::string, std::string>& env);

// The same for a rank's environment composed as `inherited` ("KEY=VALUE": the starter's own
// environment) under `overrides` (the job's env, `-x`): `overrides` gets PYTHONPATH = the
// package dir + the PYTHONPATH it sets, else the inherited one.
void AddMusterPythonPath(const std::vector<std::string>& inherited,
                         std::map<std::string, std::string>& overrides);

}  // namespace muster
