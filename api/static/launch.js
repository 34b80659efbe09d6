// hublaunch pages: follow a launch on the BinderHub-compatible /build stream, show progress and
// the build log, then go to the running server with its token. No framework, no build step.
(function () {
  "use strict";

  function $(id) { return document.getElementById(id); }

  function follow(buildPath, onReady) {
    $("progress").hidden = false;
    var source = new EventSource(buildPath);
    source.onmessage = function (message) {
      var event = JSON.parse(message.data);
      $("phase").textContent = event.phase;
      if (event.phase === "building" || event.phase === "fetching") {
        $("log").textContent += event.message + "\n";
        $("log-box").open = true;
      } else {
        $("message").textContent = event.message;
      }
      if (event.phase === "ready") {
        source.close();  // BinderHub clients close here; a reconnect would only replay
        onReady(event);
      } else if (event.phase === "failed") {
        source.close();
        $("phase").textContent = "Launch failed";
        $("message").textContent = event.message;
        $("message").className = "error";
      }
    };
    // A dropped connection is retried by the browser (CONNECTING); CLOSED means the service
    // answered with an error status, such as 429 (too many launches from this address), whose
    // body an EventSource cannot read.
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        $("phase").textContent = "Launch failed";
        $("message").textContent = "The launch service refused this launch (too many " +
          "launches from your address, or it is unavailable). Wait a minute, then reload.";
        $("message").className = "error";
      }
    };
    return source;
  }

  // A path inside the session's server: no "..", no escaped dot, slash, backslash or percent
  // (browsers read %2e as "."), no backslash (read as "/"), no leading "/", no scheme, no
  // control characters (tabs and newlines are dropped, joining what they split). The page
  // refuses such links too (api/routes/binder.py); this is the same rule, for the form's path.
  function isServerPath(path) {
    var beforeQuery = path.split(/[?#]/)[0];
    return !/[\u0000-\u001f\u007f\\]/.test(path) &&
           !/^\//.test(path) &&
           !/^[a-z][a-z0-9+.\-]*:/i.test(path) &&
           !/%(2e|2f|5c|25)/i.test(beforeQuery) &&
           beforeQuery.split("/").indexOf("..") === -1;
  }

  // The URL to open, with the token. The token opens this session's server, so the URL is
  // resolved the way the browser will and must stay under it; anything else opens its root.
  function serverUrl(event, urlpath, labpath) {
    var base = new URL(event.url);
    var path = urlpath || (labpath ? "lab/tree/" + labpath : "");
    var target = new URL(base.href);
    if (path && isServerPath(path)) {
      var candidate = new URL(path, base);
      if (candidate.origin === base.origin && candidate.pathname.indexOf(base.pathname) === 0) {
        target = candidate;
      }
    }
    var query = target.search ? target.search + "&" : "?";
    target.search = query + "token=" + encodeURIComponent(event.token);
    return target.href;
  }

  function providerSpec(kind, repo, ref, image) {
    if (kind === "image") {
      return "image/" + encodeURIComponent(image || "default");
    }
    ref = encodeURIComponent(ref || "HEAD");
    var m = /^gh:([^/\s]+\/[^/\s]+)$/.exec(repo) ||
            /^https:\/\/github\.com\/([^/\s]+\/[^/\s]+?)(?:\.git)?\/?$/.exec(repo);
    if (m) { return "gh/" + m[1] + "/" + ref; }
    m = /^gl:(\S+)$/.exec(repo) || /^https:\/\/gitlab\.com\/(\S+?)(?:\.git)?\/?$/.exec(repo);
    if (m) { return "gl/" + encodeURIComponent(m[1]) + "/" + ref; }
    m = /^gist:([^/\s]+\/[^/\s]+)$/.exec(repo) ||
        /^https:\/\/gist\.github\.com\/([^/\s]+\/[^/\s]+?)(?:\.git)?\/?$/.exec(repo);
    if (m) { return "gist/" + m[1] + "/" + ref; }
    // Data records have no ref: the identifier names the version (api/binder.py).
    m = /^(zenodo|figshare|dataverse|hydroshare):(\S+)$/.exec(repo);
    if (m) { return m[1] + "/" + encodeURI(m[2]); }
    m = /^ckan:(\S+)$/.exec(repo);
    if (m) { return "ckan/" + encodeURIComponent(m[1]); }
    return "git/" + encodeURIComponent(repo) + "/" + ref;
  }

  window.HubLaunch = {
    serverUrl: serverUrl,  // for tests
    providerSpec: providerSpec,  // for tests
    page: function (buildPath, urlpath, labpath) {
      follow(buildPath, function (event) {
        window.location.href = serverUrl(event, urlpath, labpath);
      });
    },
    form: function (publicUrl, viaLaunchPage) {
      var form = $("launch-form");
      form.querySelectorAll("input[name=kind]").forEach(function (radio) {
        radio.addEventListener("change", function () {
          var image = form.kind.value === "image";
          $("image-fields").hidden = !image;
          $("repo-fields").hidden = image;
        });
      });
      document.querySelectorAll("[data-copy]").forEach(function (button) {
        button.addEventListener("click", function () {
          var input = $(button.getAttribute("data-copy"));
          input.select();
          if (navigator.clipboard) { navigator.clipboard.writeText(input.value); }
        });
      });
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        var kind = form.kind.value, repo = $("repo").value.trim();
        var path = $("path").value.trim().replace(/^\/+/, "");  // relative to the server
        var problem = kind === "repo" && !repo ? "Give a repository URL, or choose an image." :
          path && !isServerPath(path) ? "The path must stay inside the session: no '..', " +
            "backslashes, escaped dots or slashes (%2e, %2f), or URLs." : "";
        $("form-error").textContent = problem;
        $("form-error").hidden = !problem;
        if (problem) { return; }
        var spec = providerSpec(kind, repo, $("ref").value.trim(), $("image").value.trim());
        var link = publicUrl + "/v2/" + spec + (path ? "?labpath=" + encodeURIComponent(path) : "");
        $("link").value = link;
        $("badge").value = "[![launch](" + publicUrl + "/badge.svg)](" + link + ")";
        $("share").hidden = false;
        $("launch").disabled = true;
        if (viaLaunchPage) {  // /build wants the build token the launch page carries
          window.location.href = link;
          return;
        }
        follow("/build/" + spec, function (event) {
          window.location.href = serverUrl(event, "", path);
        });
      });
    }
  };
})();
