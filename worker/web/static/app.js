// The overview's events/s chart: uPlot over the JSON the page carries (no inline script, see the CSP).
(function () {
  "use strict";
  var holder = document.getElementById("rate-chart");
  var source = document.getElementById("rates");
  if (!holder || !source || typeof uPlot === "undefined") { return; }
  var rates = JSON.parse(source.textContent);
  function size() { return { width: Math.max(240, holder.clientWidth - 16), height: 220 }; }
  var options = Object.assign(size(), {
    series: [
      {},
      { label: "produced/s", stroke: "#2f5fd0", width: 2 },
      { label: "committed/s", stroke: "#1f8a4c", width: 2 }
    ],
    axes: [{}, { label: "events/s", size: 60 }],
    scales: { y: { range: function (u, min, max) { return [0, Math.max(1, max)]; } } }
  });
  var chart = new uPlot(options, [rates.t, rates.produced, rates.committed], holder);
  window.addEventListener("resize", function () { chart.setSize(size()); });
})();
