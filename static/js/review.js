/* The review queue: a refused decision (403, 409...) is shown where it was made. htmx leaves
   error responses unswapped by default; inside an element marked data-swap-errors, the
   response (a row or a panel saying why) is swapped in like a success. */
(function () {
  "use strict";
  document.addEventListener("htmx:beforeSwap", function (evt) {
    var status = evt.detail.xhr ? evt.detail.xhr.status : 0;
    var elt = evt.detail.elt;
    if (status >= 400 && status < 500 && elt && elt.closest &&
        elt.closest("[data-swap-errors]")) {
      evt.detail.shouldSwap = true;
      evt.detail.isError = false;
    }
  });
})();
