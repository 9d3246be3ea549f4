// llamagen-gateway dashboard: charts from the JSON the page embeds, and the CSRF header for htmx requests.
(function () {
  "use strict";

  var COLOURS = { allow: "#146c2e", flag: "#b08800", review: "#c46200", block: "#a1131c" };

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : null;
  }

  document.addEventListener("htmx:configRequest", function (event) {
    var token = csrfToken();
    if (token && event.detail.verb !== "get") {
      event.detail.headers["X-CSRF-Token"] = token;
    }
  });

  function drawChart(canvas, data, stacked, kind) {
    // data.datasets: [[outcome, counts], ...] in the order allow, flag, review, block
    new window.Chart(canvas, {
      type: kind,
      data: {
        labels: data.labels,
        datasets: data.datasets.map(function (pair) {
          var outcome = pair[0];
          return {
            label: outcome, data: pair[1], backgroundColor: COLOURS[outcome],
            borderColor: COLOURS[outcome], fill: false, tension: 0.2
          };
        })
      },
      options: {
        responsive: true, maintainAspectRatio: false, animation: false,
        indexAxis: kind === "bar" && canvas.dataset.horizontal ? "y" : "x",
        scales: { x: { stacked: stacked }, y: { stacked: stacked, beginAtZero: true } },
        plugins: { legend: { position: "bottom" } }
      }
    });
  }

  function drawCharts() {
    var source = document.getElementById("chart-data");
    if (!source || !window.Chart) { return; }
    var data = JSON.parse(source.textContent);
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var name = canvas.dataset.chart;
      drawChart(canvas, data[name], name !== "series", name === "series" ? "line" : "bar");
    });
  }

  document.addEventListener("DOMContentLoaded", drawCharts);
})();
