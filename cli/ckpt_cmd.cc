// `muster ckpt ls|verify|inspect|gc|replicate`: thin wrappers over checkpoint/checkpoint_dir.h
// and checkpoint/replicate.h. DIR is a job's checkpoint directory (the one holding LATEST).

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "checkpoint/adopt.h"
#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/export.h"
#include "checkpoint/replicate.h"
#include "cli/commands.h"
#include "common/logging.h"
#include "common/strings.h"

namespace muster::cli {
namespace {

using namespace muster::checkpoint;

int Fail(const std::string& what, const Status& st) {
  std::cerr << "muster ckpt " << what << ": " << st.ToString() << "\n";
  return 1;
}

std::string Bytes(uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u ? "%.1f %s" : "%.0f %s", v, units[u]);
  return buf;
}

std::string Age(double s) {
  char buf[32];
  if (s < 120)
    std::snprintf(buf, sizeof(buf), "%.0fs", s);
  else if (s < 7200)
    std::snprintf(buf, sizeof(buf), "%.0fm", s / 60);
  else if (s < 172800)
    std::snprintf(buf, sizeof(buf), "%.0fh", s / 3600);
  else
    std::snprintf(buf, sizeof(buf), "%.0fd", s / 86400);
  return buf;
}

std::string Dims(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

int Ls(const std::string& dir) {
  auto steps = ListSteps(LocalVolume(), dir);
  if (!steps.ok()) return Fail("ls", steps.status());
  auto latest = LatestCommittedStep(LocalVolume(), dir);
  std::printf("%-12s %-10s %10s %6s %6s\n", "STEP", "STATE", "SIZE", "WORLD", "AGE");
  for (const auto& s : *steps) {
    std::string state = s.committed ? "committed" : (s.problem.empty() ? "incomplete" : "damaged");
    if (latest.ok() && s.committed && s.step == *latest) state += "*";
    std::printf("%-12lld %-10s %10s %6s %6s\n", static_cast<long long>(s.step), state.c_str(),
                s.committed ? Bytes(s.bytes).c_str() : "-",
                s.committed ? std::to_string(s.world_size).c_str() : "-", Age(s.age_s).c_str());
    if (!s.problem.empty()) std::printf("             %s\n", s.problem.c_str());
  }
  if (steps->empty()) std::printf("(no checkpoints)\n");
  // A damaged step is worth a non-zero exit: scripts that list before they resume or gc see it.
  for (const auto& s : *steps) {
    if (!s.committed && !s.problem.empty()) {
      std::fprintf(stderr, "muster ckpt ls: step %lld is damaged: %s\n",
                   static_cast<long long>(s.step), s.problem.c_str());
      return 1;
    }
  }
  return 0;
}

int Verify(const std::string& dir, int64_t step) {
  std::vector<int64_t> to_verify;
  if (step >= 0) {
    to_verify.push_back(step);
  } else {
    auto steps = ListSteps(LocalVolume(), dir);
    if (!steps.ok()) return Fail("verify", steps.status());
    for (const auto& s : *steps) {
      if (s.committed)
        to_verify.push_back(s.step);
      else if (!s.problem.empty())
        return Fail("verify", DataLossError(s.problem));
    }
    if (to_verify.empty())
      return Fail("verify", NotFoundError("no committed checkpoint in " + dir));
  }
  int bad = 0;
  for (int64_t s : to_verify) {
    Status st = VerifyStep(LocalVolume(), dir, s);
    if (st.ok()) {
      std::printf("step %lld: ok\n", static_cast<long long>(s));
    } else {
      std::printf("step %lld: %s\n", static_cast<long long>(s), st.ToString().c_str());
      ++bad;
    }
  }
  return bad ? 1 : 0;
}

int Inspect(const std::string& dir, int64_t step) {
  auto m = LoadManifest(LocalVolume(), dir, step);
  if (!m.ok()) return Fail("inspect", m.status());
  std::printf("step %lld  format v%d  world size %d  block %s  %s in %zu shards\n",
              static_cast<long long>(m->step), m->version, m->world_size,
              Bytes(m->block_size).c_str(), Bytes(m->TotalBytes()).c_str(), m->shards.size());
  for (const auto& s : m->shards) {
    std::printf("  %s  rank %d  %s  metadata %zu bytes\n", s.file.c_str(), s.rank,
                Bytes(s.size).c_str(), s.metadata.size());
  }
  for (const auto& t : m->tensors) {
    std::printf("tensor %s  %s  %s  %s\n", t.name.c_str(), std::string(DTypeName(t.dtype)).c_str(),
                Dims(t.shape).c_str(), t.replicated ? "replicated" : "sharded");
    for (const auto& s : t.slices) {
      std::printf("    offsets %s lengths %s  %s @%llu +%llu\n", Dims(s.offsets).c_str(),
                  Dims(s.lengths).c_str(), m->shards[s.shard].file.c_str(),
                  static_cast<unsigned long long>(s.byte_offset),
                  static_cast<unsigned long long>(s.byte_length));
    }
  }
  return 0;
}

// `muster ckpt adopt SRC [--into DIR] [--step N]`: checkpoint/adopt.h.
void AddAdoptCommand(CLI::App& ck, Runner* runner) {
  auto src = std::make_shared<std::string>();
  auto into = std::make_shared<std::string>();
  auto step = std::make_shared<int64_t>(-1);
  auto* adopt = ck.add_subcommand(
      "adopt",
      "Commit a finished Hugging Face checkpoint-N, DCP or torch.save directory as a step (a "
      "half-written one is refused, naming what is missing)");
  adopt->add_option("SRC", *src, "The directory to adopt")->required();
  adopt->add_option("--into", *into,
                    "The job's checkpoint directory (default: "
                    "$MUSTER_CHECKPOINT_DIR)");
  adopt->add_option("--step", *step,
                    "The step (default: N of checkpoint-N, else trainer_state.json's global_step)");
  adopt->callback([=] {
    *runner = [=] {
      AdoptOptions o;
      o.source = *src;
      o.job_dir = *into;
      if (o.job_dir.empty()) {
        o.job_dir = EnvValue("MUSTER_CHECKPOINT_DIR").value_or("");
      }
      if (o.job_dir.empty()) {
        return Fail("adopt", InvalidArgumentError("no job checkpoint directory: pass --into DIR "
                                                  "or set MUSTER_CHECKPOINT_DIR"));
      }
      o.step = *step;
      auto r = Adopt(o);
      if (!r.ok()) return Fail("adopt", r.status());
      std::printf("adopted %s checkpoint %s as step %lld of %s: %zu files, %s\n", r->format.c_str(),
                  src->c_str(), static_cast<long long>(r->step), o.job_dir.c_str(), r->files.size(),
                  Bytes(r->bytes).c_str());
      return 0;
    };
  });
}

// `muster ckpt export DIR [--step N] --format safetensors [--lora-only] [--prefix P] -o FILE`:
// checkpoint/export.h.
void AddExportCommand(CLI::App& ck, Runner* runner) {
  auto o = std::make_shared<ExportOptions>();
  auto* ex =
      ck.add_subcommand("export",
                        "Write a committed step as a safetensors file (a PEFT-style adapter with "
                        "--lora-only)");
  ex->add_option("DIR", o->job_dir, "The job's checkpoint directory")->required();
  ex->add_option("--step", o->step, "The step (default: the newest committed)");
  ex->add_option("--format", o->format, "Output format: safetensors")->required();
  ex->add_option("-o,--out", o->out, "The file to write")->required();
  ex->add_option("--prefix", o->prefix,
                 "Only tensors whose names start with P, without it (e.g. model/)");
  ex->add_flag("--lora-only", o->lora_only, "Only the LoRA adapter tensors (lora_a, lora_b)");
  ex->callback([=] {
    *runner = [=] {
      auto r = Export(*o);
      if (!r.ok()) return Fail("export", r.status());
      std::printf("exported step %lld: %d tensors to %s (%s)\n", static_cast<long long>(r->step),
                  r->tensors, o->out.c_str(), Bytes(r->bytes).c_str());
      return 0;
    };
  });
}

}  // namespace

void AddCkptCommands(CLI::App& app, Runner* runner) {
  auto* ck = app.add_subcommand("ckpt", "Inspect and manage a job's checkpoint directory");
  ck->require_subcommand(1);

  auto dir = std::make_shared<std::string>();
  auto step = std::make_shared<int64_t>(-1);

  auto* ls = ck->add_subcommand(
      "ls",
      "List steps: size, world size, committed or not, age (non-zero exit if one is damaged)");
  ls->add_option("DIR", *dir, "The job's checkpoint directory")->required();
  ls->callback([=] { *runner = [=] { return Ls(*dir); }; });

  auto* verify = ck->add_subcommand(
      "verify", "Read every byte and check every checksum (non-zero exit on any damage)");
  verify->add_option("DIR", *dir, "The job's checkpoint directory")->required();
  verify->add_option("--step", *step, "Only this step (default: every committed step)");
  verify->callback([=] { *runner = [=] { return Verify(*dir, *step); }; });

  auto* inspect = ck->add_subcommand("inspect", "Show tensors, dtypes, shapes and shards");
  inspect->add_option("DIR", *dir, "The job's checkpoint directory")->required();
  inspect->add_option("--step", *step, "The step")->required();
  inspect->callback([=] { *runner = [=] { return Inspect(*dir, *step); }; });

  auto keep = std::make_shared<int>(0);
  auto every = std::make_shared<int64_t>(0);
  auto gc_verify = std::make_shared<bool>(false);
  auto* gc = ck->add_subcommand(
      "gc",
      "Keep the newest K (plus every M-th) good steps; remove incomplete ones. A step is good "
      "when its MANIFEST validates and every shard it names is present with its size; damaged "
      "steps are left alone and never counted. Do not run while the job is saving into DIR");
  gc->add_option("DIR", *dir, "The job's checkpoint directory")->required();
  gc->add_option("--keep", *keep, "Good steps to keep (>= 1)")->required();
  gc->add_option("--every", *every, "Also keep every step divisible by M");
  gc->add_flag("--verify", *gc_verify,
               "Count a step as good only if every block checksum matches (reads every byte)");
  gc->callback([=] {
    *runner = [=] {
      auto rep = CollectGarbage(
          LocalVolume(), *dir,
          {.keep_last = *keep, .keep_every = *every, .verify_checksums = *gc_verify}, INT64_MAX);
      if (!rep.ok()) return Fail("gc", rep.status());
      for (const auto& d : rep->damaged) {
        std::printf("kept damaged step %lld (not counted): %s\n", static_cast<long long>(d.step),
                    d.problem.c_str());
      }
      for (int64_t s : rep->removed_committed)
        std::printf("removed step %lld\n", static_cast<long long>(s));
      for (const auto& p : rep->removed_incomplete)
        std::printf("removed incomplete %s\n", p.c_str());
      std::printf("%zu committed and %zu incomplete removed\n", rep->removed_committed.size(),
                  rep->removed_incomplete.size());
      return 0;
    };
  });

  auto src = std::make_shared<std::string>();
  auto dst = std::make_shared<std::string>();
  AddAdoptCommand(*ck, runner);
  AddExportCommand(*ck, runner);
  auto latest = std::make_shared<bool>(false);
  auto* rep = ck->add_subcommand(
      "replicate", "Copy a committed step to another volume; verify, then commit it there");
  rep->add_option("SRC", *src, "Source checkpoint directory")->required();
  rep->add_option("DST", *dst, "Destination checkpoint directory")->required();
  auto* step_opt = rep->add_option("--step", *step, "The step to copy");
  rep->add_flag("--latest", *latest, "Copy the newest committed step (the default)")
      ->excludes(step_opt);
  rep->callback([=] {
    *runner = [=] {
      int64_t s = *step;
      if (*latest || s < 0) {  // uses `latest` too, which keeps the flag's target alive
        auto l = LatestCommittedStep(LocalVolume(), *src);
        if (!l.ok()) return Fail("replicate", l.status());
        s = *l;
      }
      auto r = Replicate(LocalVolume(), *src, LocalVolume(), *dst, s);
      if (!r.ok()) return Fail("replicate", r.status());
      if (r->already_present) {
        std::printf("step %lld already committed and verified at %s\n", static_cast<long long>(s),
                    dst->c_str());
      } else {
        std::printf("step %lld replicated to %s: %d shards copied (%s), %d resumed, verified\n",
                    static_cast<long long>(s), dst->c_str(), r->shards_copied,
                    Bytes(r->bytes_copied).c_str(), r->shards_resumed);
      }
      return 0;
    };
  });
}

}  // namespace muster::cli
