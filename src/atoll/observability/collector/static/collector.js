// atoll trace view: small progressive enhancements over server-rendered pages.
// Reads the DOM only; never builds markup from span data.
(function () {
  "use strict";

  function localTimes() {
    document.querySelectorAll("time[data-ns]").forEach(function (el) {
      var ms = Number(el.getAttribute("data-ns")) / 1e6;
      if (!isFinite(ms)) return;
      var d = new Date(ms);
      var pad = function (n, w) { return String(n).padStart(w || 2, "0"); };
      el.title = el.textContent;
      el.textContent = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
        pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + "." + pad(d.getMilliseconds(), 3);
    });
  }

  function searchPage() {
    var service = document.getElementById("f-service");
    var operation = document.getElementById("f-operation");
    if (service && operation) {
      var all = JSON.parse(operation.getAttribute("data-operations") || "{}");
      service.addEventListener("change", function () {
        var names = [];
        if (service.value) names = all[service.value] || [];
        else Object.keys(all).forEach(function (k) { names = names.concat(all[k]); });
        names = Array.from(new Set(names)).sort();
        var current = operation.value;
        while (operation.options.length > 1) operation.remove(1);
        names.forEach(function (name) {
          var opt = document.createElement("option");
          opt.value = name; opt.textContent = name;
          if (name === current) opt.selected = true;
          operation.appendChild(opt);
        });
      });
    }
    document.querySelectorAll("tr.trace-row").forEach(function (row) {
      row.addEventListener("click", function (ev) {
        if (ev.target.closest("a")) return;
        window.location.href = "/traces/" + row.getAttribute("data-trace");
      });
    });
  }

  function rows() { return Array.prototype.slice.call(document.querySelectorAll(".span-row")); }
  function depth(row) { return Number(row.getAttribute("data-depth")); }
  function detailOf(row) { return document.getElementById("detail-" + row.getAttribute("data-span")); }

  // The rows are in depth-first order, so a row's descendants are the rows after it
  // that are deeper than it.
  function descendants(row) {
    var all = rows(), out = [], i = all.indexOf(row), d = depth(row);
    for (var j = i + 1; j < all.length && depth(all[j]) > d; j++) out.push(all[j]);
    return out;
  }

  function setOpen(row, open) {
    var detail = detailOf(row);
    if (!detail) return;
    detail.hidden = !open || row.hidden;
    row.classList.toggle("open", open);
    row.setAttribute("aria-expanded", open ? "true" : "false");
  }

  function refreshVisibility() {
    var all = rows(), hideBelow = Infinity;
    all.forEach(function (row) {
      var d = depth(row);
      if (d <= hideBelow) hideBelow = Infinity;
      row.hidden = d > hideBelow;
      var detail = detailOf(row);
      if (detail) detail.hidden = row.hidden || !row.classList.contains("open");
      if (!row.hidden && row.classList.contains("collapsed")) hideBelow = d;
    });
  }

  function reveal(row) {
    var all = rows(), i = all.indexOf(row), d = depth(row);
    for (var j = i - 1; j >= 0 && d > 0; j--) {
      if (depth(all[j]) < d) { all[j].classList.remove("collapsed"); d = depth(all[j]); }
    }
    refreshVisibility();
  }

  function focusSpan(id) {
    var row = document.getElementById("span-" + id);
    if (!row) return;
    reveal(row);
    setOpen(row, true);
    row.scrollIntoView({ block: "center" });
    row.classList.remove("flash"); void row.offsetWidth; row.classList.add("flash");
    row.focus({ preventScroll: true });
  }

  function tracePage() {
    var container = document.getElementById("spans");
    if (!container) return;
    container.addEventListener("click", function (ev) {
      var row = ev.target.closest(".span-row");
      if (!row) return;
      if (ev.target.closest(".twisty")) {
        row.classList.toggle("collapsed");
        refreshVisibility();
        return;
      }
      setOpen(row, !row.classList.contains("open"));
    });
    container.addEventListener("keydown", function (ev) {
      var row = ev.target.closest(".span-row");
      if (!row) return;
      var visible = rows().filter(function (r) { return !r.hidden; });
      var i = visible.indexOf(row);
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); setOpen(row, !row.classList.contains("open")); }
      else if (ev.key === "ArrowDown" && i + 1 < visible.length) { ev.preventDefault(); visible[i + 1].focus(); }
      else if (ev.key === "ArrowUp" && i > 0) { ev.preventDefault(); visible[i - 1].focus(); }
      else if (ev.key === "ArrowLeft" && row.querySelector(".twisty")) { row.classList.add("collapsed"); refreshVisibility(); }
      else if (ev.key === "ArrowRight" && row.querySelector(".twisty")) { row.classList.remove("collapsed"); refreshVisibility(); }
    });
    document.addEventListener("click", function (ev) {
      var a = ev.target.closest("a[href^='#span-']");
      if (!a) return;
      ev.preventDefault();
      var id = a.getAttribute("href").slice(6);
      history.replaceState(null, "", "#span-" + id);
      focusSpan(id);
    });
    document.querySelectorAll("[data-action]").forEach(function (button) {
      button.addEventListener("click", function () {
        var open = button.getAttribute("data-action") === "expand-details";
        if (open) rows().forEach(function (r) { r.classList.remove("collapsed"); });
        refreshVisibility();
        rows().forEach(function (r) { setOpen(r, open); });
      });
    });
    var filter = document.getElementById("span-filter");
    if (filter) {
      filter.addEventListener("input", function () {
        var q = filter.value.trim().toLowerCase();
        rows().forEach(function (r) {
          var hit = q && r.getAttribute("data-search").indexOf(q) !== -1;
          r.classList.toggle("match", !!hit);
          r.classList.toggle("dim", !!q && !hit);
        });
      });
    }
    if (window.location.hash.indexOf("#span-") === 0) focusSpan(window.location.hash.slice(6));
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes();
    searchPage();
    tracePage();
  });
})();
