#include "tests/testing/log_capture.h"

#include "common/logging.h"

namespace muster::testing {

class LogCapture::Sink : public spdlog::sinks::base_sink<std::mutex> {
 public:
  std::vector<std::string> Lines() {
    std::lock_guard<std::mutex> l(lines_mu_);
    return lines_;
  }
  bool WaitFor(const std::string& needle, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> l(lines_mu_);
    return cv_.wait_for(l, timeout, [&] {
      for (const auto& s : lines_)
        if (s.find(needle) != std::string::npos) return true;
      return false;
    });
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t buf;
    formatter_->format(msg, buf);
    std::lock_guard<std::mutex> l(lines_mu_);
    lines_.emplace_back(buf.data(), buf.size());
    cv_.notify_all();
  }
  void flush_() override {}

 private:
  std::mutex lines_mu_;
  std::condition_variable cv_;
  std::vector<std::string> lines_;
};

LogCapture::LogCapture() : sink_(std::make_shared<Sink>()) { log::AddSink(sink_); }
LogCapture::~LogCapture() { log::RemoveSink(sink_); }
std::vector<std::string> LogCapture::Lines() const { return sink_->Lines(); }
bool LogCapture::WaitFor(const std::string& needle, std::chrono::milliseconds timeout) const {
  return sink_->WaitFor(needle, timeout);
}

}  // namespace muster::testing
