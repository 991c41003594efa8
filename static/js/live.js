/* Live pages over websockets (htmx ws extension, loaded by base.html).
   On every (re)connect, tell the server the last ledger event this page shows, so it resends
   the fragment when something was missed. While a socket is open, the polling fallback
   (elements with hx-trigger="every ...") stays quiet; when it closes, polling resumes. */
(function () {
  "use strict";
  var open = 0;

  function lastSeq(socketElt) {
    var selector = socketElt.getAttribute("data-live-seq-from");
    var source = selector ? document.querySelector(selector) : null;
    var seq = source ? parseInt(source.getAttribute("data-seq"), 10) : NaN;
    return isNaN(seq) ? null : seq;
  }

  document.addEventListener("htmx:wsOpen", function (evt) {
    open += 1;
    document.documentElement.setAttribute("data-live", "open");
    evt.detail.socketWrapper.send(JSON.stringify({ seq: lastSeq(evt.detail.elt) }));
  });

  document.addEventListener("htmx:wsClose", function () {
    open = Math.max(0, open - 1);
    if (open === 0) {
      document.documentElement.setAttribute("data-live", "closed");
    }
  });

  document.addEventListener("htmx:beforeRequest", function (evt) {
    var elt = evt.detail.elt;
    var trigger = elt && elt.getAttribute ? elt.getAttribute("hx-trigger") || "" : "";
    if (open > 0 && trigger.indexOf("every") === 0) {
      evt.preventDefault();
    }
  });
})();
