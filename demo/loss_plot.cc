#include "demo/loss_plot.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace muster::demo {

namespace {

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '&':
        out += "&amp;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// A "nice" tick step for a span: 1, 2 or 5 times a power of ten.
double TickStep(double span, int target) {
  if (span <= 0) return 1;
  double raw = span / target;
  double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (raw <= m * p) return m * p;
  }
  return 10 * p;
}

}  // namespace

std::string RenderLossSvg(const std::string& title, const std::vector<LossSeries>& series,
                          const std::vector<PlotMarker>& markers) {
  constexpr double W = 760, H = 420, L = 64, R = 24, T = 44, B = 56;
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"};
  double x0 = std::numeric_limits<double>::max(), x1 = std::numeric_limits<double>::lowest();
  double y0 = x0, y1 = x1;
  for (const auto& s : series) {
    for (auto [step, loss] : s.points) {
      if (!std::isfinite(loss)) continue;
      x0 = std::min(x0, double(step));
      x1 = std::max(x1, double(step));
      y0 = std::min(y0, loss);
      y1 = std::max(y1, loss);
    }
  }
  for (const auto& m : markers) {
    x0 = std::min(x0, double(m.step));
    x1 = std::max(x1, double(m.step));
  }
  if (x0 > x1) x0 = 0, x1 = 1;
  if (y0 > y1) y0 = 0, y1 = 1;
  x0 = std::min(x0, 0.0);
  if (x1 == x0) x1 = x0 + 1;
  double pad = (y1 - y0) * 0.08 + 1e-9;
  y0 -= pad;
  y1 += pad;
  auto X = [&](double v) { return L + (v - x0) / (x1 - x0) * (W - L - R); };
  auto Y = [&](double v) { return T + (y1 - v) / (y1 - y0) * (H - T - B); };

  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
      "viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"24\" font-size=\"15\" font-weight=\"bold\">{3}</text>\n",
      W, H, L, Escape(title));
  // Axes and ticks.
  svg += fmt::format("<path d=\"M{0},{1} L{0},{2} L{3},{2}\" stroke=\"black\" fill=\"none\"/>\n", L,
                     T, H - B, W - R);
  double xs = TickStep(x1 - x0, 8);
  for (double v = std::ceil(x0 / xs) * xs; v <= x1 + 1e-9; v += xs) {
    svg += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"black\"/>"
        "<text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>\n",
        X(v), H - B, H - B + 5, H - B + 18, fmt::format("{:g}", v));
  }
  double ys = TickStep(y1 - y0, 6);
  for (double v = std::ceil(y0 / ys) * ys; v <= y1 + 1e-9; v += ys) {
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>"
        "<text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5}</text>\n",
        L, Y(v), W - R, L - 6, Y(v) + 4, fmt::format("{:g}", v));
  }
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n",
                     (L + W - R) / 2, H - 16);
  svg += fmt::format(
      "<text x=\"16\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {0})\">"
      "training loss</text>\n",
      (T + H - B) / 2);
  // Markers.
  int mi = 0;
  for (const auto& m : markers) {
    double x = X(double(m.step));
    svg += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#555\" "
        "stroke-dasharray=\"5,4\"/>"
        "<text x=\"{3:.1f}\" y=\"{4}\" fill=\"#333\">{5}</text>\n",
        x, T, H - B, x + 4, T + 14 + 14 * (mi++ % 3), Escape(m.label));
  }
  // Series and legend.
  for (size_t i = 0; i < series.size(); ++i) {
    const auto& s = series[i];
    const char* c = colors[i % 6];
    std::string pts;
    for (auto [step, loss] : s.points) {
      if (!std::isfinite(loss)) continue;
      pts += fmt::format("{:.1f},{:.1f} ", X(double(step)), Y(loss));
    }
    svg += fmt::format(
        "<polyline class=\"series\" points=\"{}\" fill=\"none\" stroke=\"{}\" "
        "stroke-width=\"2\"/>\n",
        pts, c);
    double ly = T + 8 + 16 * double(i);
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"3\"/>"
        "<text x=\"{4}\" y=\"{5}\">{6}</text>\n",
        W - R - 210, ly, W - R - 190, c, W - R - 184, ly + 4, Escape(s.label));
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace muster::demo
