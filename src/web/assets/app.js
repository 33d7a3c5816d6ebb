// tollgate portal: refreshes the live numbers on the overview without a reload. The page is
// complete without this script; it only polls the JSON the server already computes.
(function () {
  "use strict";
  var root = document.getElementById("live");
  if (!root || !window.fetch) { return; }
  var url = root.getAttribute("data-live-url");
  function refresh() {
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        var nodes = document.querySelectorAll("[data-live]");
        for (var i = 0; i < nodes.length; i++) {
          var key = nodes[i].getAttribute("data-live");
          if (Object.prototype.hasOwnProperty.call(data, key)) {
            nodes[i].textContent = String(data[key]);
          }
        }
        var low = document.getElementById("low-balance");
        if (low) { low.hidden = !data.low_balance; }
        root.setAttribute("data-updated", String(Date.now()));
      })
      .catch(function () { /* keep the last numbers; try again on the next tick */ });
  }
  setInterval(refresh, 2000);
})();
