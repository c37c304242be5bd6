// edgefleet dashboard: draws every <div class="chart" data-chart="{...}"> with
// uPlot (assets/uPlot.iife.min.js, MIT, vendored). The data is the
// dashboard's Chart view: x in seconds since the Unix epoch (UTC), one
// series per [label, values] (null: no value), an optional threshold line.
"use strict";
(function () {
  var COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#393b79", "#637939"];

  function draw(el) {
    var c;
    try { c = JSON.parse(el.getAttribute("data-chart")); } catch (e) { return; }
    if (!c.x || c.x.length === 0) { el.setAttribute("data-drawn", "empty"); return; }
    var data = [c.x];
    var series = [{ label: "time (UTC)" }];
    c.series.forEach(function (s, i) {
      data.push(s[1]);
      series.push({ label: s[0], stroke: COLORS[i % COLORS.length], width: 1.5,
                    spanGaps: !!c.span_gaps, points: { show: c.x.length < 60 } });
    });
    if (c.threshold !== null && c.threshold !== undefined) {
      data.push(c.x.map(function () { return c.threshold; }));
      series.push({ label: "threshold", stroke: "#000", width: 1, dash: [6, 4],
                    points: { show: false } });
    }
    var width = Math.max(320, Math.min(el.parentElement.clientWidth || 600, 1200));
    var opts = {
      width: width, height: 260, tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      series: series,
      axes: [{ label: "time (UTC)" }, { label: c.y_label, size: 60 }],
      scales: { x: { time: true } },
      legend: { live: true }
    };
    new uPlot(opts, data, el);
    el.setAttribute("data-drawn", "1");
  }

  function drawAll() {
    if (typeof uPlot === "undefined") { return; }
    var els = document.querySelectorAll("div.chart[data-chart]");
    for (var i = 0; i < els.length; i++) { draw(els[i]); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", drawAll);
  } else {
    drawAll();
  }
})();
