// Caudal console: draws each chart from the JSON the page carries (uPlot). A chart's container
// gets data-drawn="<points>" once drawn, so a test can tell it is there.
(function () {
  "use strict";
  function fmtTime(s) { return new Date(s * 1000).toISOString().slice(0, 16).replace("T", " "); }
  function draw(holder) {
    var data = JSON.parse(holder.querySelector("script.chart-data").textContent);
    var kind = holder.dataset.kind;
    var width = Math.max(320, holder.clientWidth || 800);
    var series = [{ label: "UTC", value: function (u, v) { return v == null ? "" : fmtTime(v); } }];
    var columns = [data.x];
    if (kind === "flow") {
      series.push({ label: holder.dataset.label, stroke: "#0b5cad", width: 2 });
      series.push({ label: holder.dataset.band + " ↓", stroke: "#7a9cc6", dash: [4, 4] });
      series.push({ label: holder.dataset.band + " ↑", stroke: "#7a9cc6", dash: [4, 4] });
      columns.push(data.flow_avg, data.flow_min, data.flow_max);
    } else if (kind === "volume") {
      series.push({ label: holder.dataset.label, stroke: "#146c2e", fill: "rgba(20,108,46,0.15)",
                    paths: uPlot.paths.bars ? uPlot.paths.bars({ size: [0.8] }) : undefined });
      columns.push(data.volume);
    } else {
      series.push({ label: holder.dataset.label, stroke: "#7a4d00", width: 2 });
      columns.push(data.level_avg);
    }
    var plot = new uPlot({ width: width, height: 220, series: series,
                           scales: { x: { time: true } }, axes: [{}, {}] }, columns,
                         holder.querySelector(".plot"));
    holder.dataset.drawn = String(data.x.length);
    return plot;
  }
  function init() {
    document.querySelectorAll(".chart").forEach(function (h) {
      try { draw(h); } catch (e) { h.dataset.error = String(e); }
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); }
  else { init(); }
})();
