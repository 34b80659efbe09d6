"""BinderHub-compatible links: ``/build/<provider>/<spec>`` (the event stream Binder clients such
as thebe and Jupyter Book's launch buttons speak) and ``/v2/<provider>/<spec>`` (launch pages).

Providers and specs, as BinderHub writes them:
``gh/<owner>/<repo>/<ref>``, ``gl/<url-escaped namespace/project>/<ref>``,
``git/<url-escaped url>/<ref>``, ``gist/<user>/<id>[/<ref>]``, the data records
``zenodo/<DOI>``, ``figshare/<DOI>``, ``dataverse/<DOI>``, ``hydroshare/<resource id>`` and
``ckan/<url-escaped dataset URL>``, and hublaunch's ``image/<url-escaped image name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from api.schemas import LaunchRequest

# Data records: the spec is the record's identifier (a DOI keeps its slashes).
RECORDS = ("zenodo", "figshare", "dataverse", "hydroshare", "ckan")
PROVIDERS = ("gh", "gl", "git", "gist", *RECORDS, "image")
DOI_RECORDS = ("zenodo", "figshare", "dataverse")
# The OpenAPI parameters of /build/{provider}/{spec} (its handler reads the raw path itself).
BUILD_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "provider",
        "in": "path",
        "required": True,
        "description": "Where the spec points: a GitHub or GitLab repository, any git URL, a "
        "GitHub gist, a record of a research data repository (Zenodo, Figshare, Dataverse, "
        "HydroShare, CKAN), or a ready image.",
        "schema": {"type": "string", "enum": list(PROVIDERS)},
    },
    {
        "name": "spec",
        "in": "path",
        "required": True,
        "description": "`<owner>/<repo>/<ref>` (gh), `<url-escaped namespace/project>/<ref>` "
        "(gl), `<url-escaped url>/<ref>` (git), `<user>/<id>[/<ref>]` (gist), a DOI (zenodo, "
        "figshare, dataverse), a resource id (hydroshare), a url-escaped dataset URL (ckan) or "
        "`<url-escaped image name>` (image).",
        "schema": {"type": "string", "minLength": 1},
        "examples": {"image": {"value": "default"}},
    },
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "`<launch id>:<event id>`, sent by a reconnecting EventSource: the stream "
        "continues that launch after that event instead of starting a new one.",
        "schema": {"type": "string"},
    },
]


class BadSpec(ValueError):
    """The provider or spec cannot be read; the message says what form is expected."""


@dataclass(frozen=True)
class BinderSpec:
    provider: str
    spec: str  # as it appears in the URL (still escaped)

    def request(self, *, build_only: bool = False) -> LaunchRequest:
        """The launch this link asks for (validated like any POST /api/launches body)."""
        fields = {**self._fields(), **({"build_only": True} if build_only else {})}
        try:
            return LaunchRequest.model_validate(fields)
        except ValueError as e:
            raise BadSpec(_first_error(e)) from e

    def _fields(self) -> dict[str, Any]:
        if self.provider == "image":
            return {"image": unquote(self.spec)}
        if self.provider == "gh":
            parts = self.spec.split("/", 2)
            if len(parts) != 3 or not all(parts):
                raise BadSpec("gh links read gh/<owner>/<repo>/<ref>")
            return {"repo": f"gh:{parts[0]}/{parts[1]}", "ref": unquote(parts[2])}
        if self.provider == "gist":
            parts = self.spec.split("/", 2)
            if len(parts) < 2 or not all(parts):
                raise BadSpec("gist links read gist/<user>/<id>[/<ref>]")
            ref = unquote(parts[2]) if len(parts) == 3 else "HEAD"
            return {"repo": f"gist:{parts[0]}/{parts[1]}", "ref": ref}
        if self.provider in RECORDS:
            return {"repo": f"{self.provider}:{unquote(self.spec)}"}
        if self.provider in ("gl", "git"):
            head, _, ref = self.spec.partition("/")
            if not head or not ref:
                form = (
                    "<url-escaped namespace/project>"
                    if self.provider == "gl"
                    else ("<url-escaped url>")
                )
                raise BadSpec(f"{self.provider} links read {self.provider}/{form}/<ref>")
            repo = f"gl:{unquote(head)}" if self.provider == "gl" else unquote(head)
            return {"repo": repo, "ref": unquote(ref)}
        raise BadSpec(f"unknown provider {self.provider!r}; use one of: {', '.join(PROVIDERS)}")

    @property
    def path(self) -> str:
        return f"{self.provider}/{self.spec}"


def from_raw_path(raw_path: bytes, prefix: str) -> BinderSpec:
    """Read the spec from the undecoded path: escaped slashes (%2F) are part of a spec."""
    path = raw_path.decode("latin-1").split("?", 1)[0]
    rest = path[len(prefix) :] if path.startswith(prefix) else ""
    provider, _, spec = rest.partition("/")
    if provider not in PROVIDERS:
        raise BadSpec(f"unknown provider {provider!r}; use one of: {', '.join(PROVIDERS)}")
    if not spec:
        raise BadSpec(f"{provider} links need a spec after {prefix}{provider}/")
    return BinderSpec(provider, spec)


def link_for(spec: dict[str, Any]) -> str:
    """The ``<provider>/<spec>`` that launches a stored launch spec again."""
    if "image" in spec:
        return f"image/{quote(spec['image'], safe='')}"
    url, ref = str(spec["repo"]), quote(str(spec.get("ref", "HEAD")), safe="")
    scheme, _, identifier = url.partition(":")
    if scheme in RECORDS:
        return f"{scheme}/{quote(identifier, safe='' if scheme == 'ckan' else '/')}"
    gist = "https://gist.github.com/"
    if url.startswith(gist) and url.endswith(".git"):
        return f"gist/{url[len(gist) : -len('.git')]}/{ref}"
    github = "https://github.com/"
    if url.startswith(github) and url[len(github) :].count("/") == 1:
        return f"gh/{url[len(github) :].removesuffix('.git')}/{ref}"
    gitlab = "https://gitlab.com/"
    if url.startswith(gitlab):
        return f"gl/{quote(url[len(gitlab) :].removesuffix('.git'), safe='')}/{ref}"
    return f"git/{quote(url, safe='')}/{ref}"


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        for error in errors():
            return str(error.get("msg", e)).removeprefix("Value error, ")
    return str(e)


def ready_fields(spec: dict[str, Any], commit: str | None, launch_host: str) -> dict[str, str]:
    """What BinderHub's ``ready`` event says besides the URL, token and image, with the same
    meaning: the repository and the page of the commit launched, where to launch again, and the
    launch's link as asked (``binder_request``) and pinned to that commit
    (``binder_persistent_request``). Clients build share links and badges from them."""
    fields = {"binder_launch_host": launch_host, "binder_request": f"v2/{link_for(spec)}"}
    if "repo" not in spec:
        fields["binder_persistent_request"] = fields["binder_request"]
        return fields
    url = str(spec["repo"])
    scheme, _, identifier = url.partition(":")
    if scheme in RECORDS:
        # The identifier names the version already (BinderHub's providers say the same); the
        # record's page: its DOI, a HydroShare resource's page, a CKAN dataset's URL.
        fields["binder_persistent_request"] = fields["binder_request"]
        fields["repo_url"] = fields["binder_ref_url"] = _record_url(scheme, identifier)
        return fields
    pinned = {**spec, "ref": commit} if commit else spec
    fields["repo_url"] = url
    fields["binder_persistent_request"] = f"v2/{link_for(pinned)}"
    fields["binder_ref_url"] = _ref_url(url, commit or str(spec.get("ref", "HEAD")))
    return fields


def _record_url(scheme: str, identifier: str) -> str:
    if scheme in DOI_RECORDS:
        return f"https://doi.org/{identifier}"
    if scheme == "hydroshare":
        return f"https://www.hydroshare.org/resource/{identifier}/"
    return identifier


def _ref_url(url: str, ref: str) -> str:
    """The web page of the launched commit where the host has one (GitHub, GitLab); else the
    repository's URL, as BinderHub's git provider says."""
    base = url.removesuffix(".git")
    if url.startswith("https://gist.github.com/"):
        return f"{base}/{ref}"
    if url.startswith("https://github.com/"):
        return f"{base}/tree/{ref}"
    if url.startswith("https://gitlab.com/"):
        return f"{base}/-/tree/{ref}"
    return url
