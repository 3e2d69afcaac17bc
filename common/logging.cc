#include "common/logging.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/dist_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <mutex>

#include "common/strings.h"

namespace muster::log {
namespace {

struct State {
  std::mutex mu;
  std::shared_ptr<spdlog::sinks::dist_sink_mt> dist;
  spdlog::level::level_enum level = spdlog::level::info;
  std::string context;  // " job=.. node=.. rank=.." or empty; GUARDED_BY(mu)
};

State& GetState() {
  static State* state = [] {
    auto* s = new State;
    s->dist = std::make_shared<spdlog::sinks::dist_sink_mt>();
    s->dist->add_sink(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    if (auto env = EnvValue("MUSTER_LOG_LEVEL")) {
      auto lvl = spdlog::level::from_str(*env);
      if (lvl != spdlog::level::off || *env == "off") s->level = lvl;
    }
    return s;
  }();
  return *state;
}

class ContextFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg&, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    State& s = GetState();
    std::lock_guard<std::mutex> lock(s.mu);
    dest.append(s.context.data(), s.context.data() + s.context.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<ContextFlag>();
  }
};

std::unique_ptr<spdlog::formatter> MakeFormatter() {
  auto f = std::make_unique<spdlog::pattern_formatter>();
  f->add_flag<ContextFlag>('*').set_pattern("%Y-%m-%d %H:%M:%S.%e %^%L%$ %n%* | %v");
  return f;
}

}  // namespace

Status InitLogging(std::string_view level) {
  std::string name(level);
  if (name.empty()) {
    name = EnvValue("MUSTER_LOG_LEVEL").value_or("info");
  }
  auto lvl = spdlog::level::from_str(name);
  if (lvl == spdlog::level::off && name != "off") {
    return InvalidArgumentError("unknown log level '" + name +
                                "' (want trace, debug, info, warn, error, critical or off)");
  }
  State& s = GetState();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.level = lvl;
  }
  spdlog::apply_all([lvl](const std::shared_ptr<spdlog::logger>& l) { l->set_level(lvl); });
  return Status::Ok();
}

std::shared_ptr<spdlog::logger> Get(const std::string& name) {
  if (auto existing = spdlog::get(name)) return existing;
  State& s = GetState();
  auto logger = std::make_shared<spdlog::logger>(name, s.dist);
  logger->set_formatter(MakeFormatter());
  {
    std::lock_guard<std::mutex> lock(s.mu);
    logger->set_level(s.level);
  }
  logger->flush_on(spdlog::level::warn);
  try {
    spdlog::register_logger(logger);
  } catch (const spdlog::spdlog_ex&) {
    // Lost a race with another thread registering the same name: use theirs.
    if (auto existing = spdlog::get(name)) return existing;
  }
  return logger;
}

void SetContext(std::string job, std::string node, std::string rank) {
  State& s = GetState();
  std::lock_guard<std::mutex> lock(s.mu);
  if (job.empty() && node.empty() && rank.empty()) {
    s.context.clear();
    return;
  }
  auto dash = [](std::string& v) -> std::string& {
    if (v.empty()) v = "-";
    return v;
  };
  s.context = " job=" + dash(job) + " node=" + dash(node) + " rank=" + dash(rank);
}

void AddSink(std::shared_ptr<spdlog::sinks::sink> sink) {
  sink->set_formatter(MakeFormatter());
  GetState().dist->add_sink(std::move(sink));
}

void RemoveSink(const std::shared_ptr<spdlog::sinks::sink>& sink) {
  GetState().dist->remove_sink(sink);
}

namespace internal {
CheckFailure::CheckFailure(const char* file, int line, const char* condition) {
  stream_ << file << ":" << line << ": check failed: " << condition << " ";
}
CheckFailure::~CheckFailure() {
  auto logger = Get("check");
  logger->critical("{}", stream_.str());
  logger->flush();
  std::abort();
}
}  // namespace internal

}  // namespace muster::log
