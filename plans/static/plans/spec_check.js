// Validate price specs as staff type them: each spec textarea asks the admin's check-spec view
// and shows its verdict (the field that is wrong, or "valid") right under the box.
(function () {
  "use strict";
  function csrfToken() {
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }
  function attach(textarea) {
    if (textarea.dataset.specCheck) return;
    textarea.dataset.specCheck = "1";
    var verdict = document.createElement("div");
    verdict.className = "help spec-verdict";
    textarea.insertAdjacentElement("afterend", verdict);
    var timer = null;
    textarea.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        if (!textarea.value.trim()) { verdict.textContent = ""; return; }
        var body = new URLSearchParams({spec: textarea.value});
        fetch(checkUrl() + "check-spec/", {
          method: "POST", body: body, headers: {"X-CSRFToken": csrfToken()}, credentials: "same-origin"
        }).then(function (r) { return r.json(); }).then(function (result) {
          verdict.textContent = result.ok ? "✓ valid price" : "✗ " + result.error;
          verdict.style.color = result.ok ? "green" : "#ba2121";
        });
      }, 300);
    });
  }
  function checkUrl() {
    var match = window.location.pathname.match(/^(.*\/plans\/price\/)/);
    return match ? match[1] : "/admin/plans/price/";
  }
  function scan() { document.querySelectorAll("textarea[name$='spec']").forEach(attach); }
  document.addEventListener("DOMContentLoaded", scan);
  document.addEventListener("formset:added", scan);
})();
