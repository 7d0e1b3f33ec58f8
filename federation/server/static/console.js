// meshfed console: the status API token and the connection state. Everything else is htmx
// (federation/server/console.py renders every panel on the server).
//
// The token: a controller whose status API wants one for reads answers the console's data
// requests 401. The operator hands the token over in the URL fragment (/console/#token=...,
// which the browser never sends to the server, so it lands in no request log) or pastes it
// into the form that a 401 shows. It is kept in sessionStorage (this tab only, gone when the
// tab closes) and sent as "Authorization: Bearer ..." on every htmx request.
(function () {
  "use strict";
  var KEY = "meshfed.console.token";

  var fromFragment = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
  if (fromFragment) {
    sessionStorage.setItem(KEY, decodeURIComponent(fromFragment[1]));
    // drop it from the address bar and the history
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
  }

  function byId(id) { return document.getElementById(id); }

  function setConn(state, text) {
    var conn = byId("conn");
    if (!conn) { return; }
    conn.className = "conn " + state;
    conn.textContent = text;
  }

  document.addEventListener("htmx:configRequest", function (evt) {
    var token = sessionStorage.getItem(KEY);
    if (token) {
      evt.detail.headers["Authorization"] = "Bearer " + token;
    }
  });

  document.addEventListener("htmx:afterRequest", function (evt) {
    var xhr = evt.detail.xhr;
    if (!evt.detail.elt || evt.detail.elt.id !== "poller" || !xhr) { return; }
    if (xhr.status === 200) {
      setConn("live", "live");
      byId("auth").hidden = true;
    }
  });

  document.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail.xhr;
    if (xhr && xhr.status === 401) {
      var config = evt.detail.requestConfig || {};
      var sent = (config.headers || {})["Authorization"] || "";
      var current = sessionStorage.getItem(KEY);
      if (current && sent !== "Bearer " + current) {
        return;   // the answer to a request sent before this token was given: try the token first
      }
      sessionStorage.removeItem(KEY);
      setConn("auth", "needs the status API token");
      byId("auth").hidden = false;
    } else if (evt.detail.elt && evt.detail.elt.id === "poller") {
      setConn("down", "controller answered " + (xhr ? xhr.status : "?"));
    }
  });

  document.addEventListener("htmx:sendError", function (evt) {
    if (evt.detail.elt && evt.detail.elt.id === "poller") {
      setConn("down", "cannot reach the controller (retrying)");
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var form = byId("auth");
    form.addEventListener("submit", function (evt) {
      evt.preventDefault();
      var input = byId("auth-token");
      if (input.value) {
        sessionStorage.setItem(KEY, input.value.trim());
        input.value = "";
        form.hidden = true;
        setConn("", "connecting…");   // the next poll (within a second) carries it
      }
    });
  });
}());
