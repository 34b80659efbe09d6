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
    return source;
  }

  function serverUrl(event, urlpath, labpath) {
    var path = urlpath || (labpath ? "lab/tree/" + labpath : "");
    path = path.replace(/^\/+/, "");
    var sep = path.indexOf("?") === -1 ? "?" : "&";
    return event.url + path + sep + "token=" + encodeURIComponent(event.token);
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
    return "git/" + encodeURIComponent(repo) + "/" + ref;
  }

  window.HubLaunch = {
    page: function (buildPath, urlpath, labpath) {
      follow(buildPath, function (event) {
        window.location.href = serverUrl(event, urlpath, labpath);
      });
    },
    form: function (publicUrl) {
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
        if (kind === "repo" && !repo) {
          $("form-error").textContent = "Give a repository URL, or choose an image.";
          $("form-error").hidden = false;
          return;
        }
        $("form-error").hidden = true;
        var spec = providerSpec(kind, repo, $("ref").value.trim(), $("image").value.trim());
        var path = $("path").value.trim();
        var link = publicUrl + "/v2/" + spec + (path ? "?labpath=" + encodeURIComponent(path) : "");
        $("link").value = link;
        $("badge").value = "[![launch](" + publicUrl + "/badge.svg)](" + link + ")";
        $("share").hidden = false;
        $("launch").disabled = true;
        follow("/build/" + spec, function (event) {
          window.location.href = serverUrl(event, "", path);
        });
      });
    }
  };
})();
