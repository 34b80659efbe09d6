"""People's paths through a real browser (Debian's Chromium driven by Playwright) against real
jupyterhub-singleuser servers. Screenshots go to test-artifacts/screenshots/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from hublaunch.stack import Stack, free_port
from tests.integration.conftest import ARTIFACTS, wait_for
from tests.integration.gitserver import GitServer

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
SHOTS = ARTIFACTS / "screenshots"
LAB = re.compile(r".*/user/hl-[0-9a-f]{16}/lab.*")
# Without the background-networking switches Chromium keeps calling out to the internet.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(90_000)
    # Assertions wait as long as actions: JupyterLab opening a notebook took over expect()'s
    # default 5 s on a slow day (a real server, two test suites side by side on 2 cores).
    expect.set_options(timeout=90_000)
    yield page
    context.close()


def shot(page: Page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def user_of(page: Page) -> str:
    match = re.search(r"/user/(hl-[0-9a-f]{16})/", page.url)
    assert match, page.url
    return match.group(1)


def test_form_launches_an_image_into_jupyterlab(page: Page, real_stack: Stack) -> None:
    page.goto(f"{real_stack.public_url}/")
    shot(page, "01-form")
    page.get_by_label("A ready image").check()
    page.get_by_label("Image", exact=True).fill("default")
    page.get_by_role("button", name="Launch").click()
    expect(page.locator("#link")).to_have_value(f"{real_stack.public_url}/v2/image/default")
    expect(page.locator("#badge")).to_have_value(
        f"[![launch]({real_stack.public_url}/badge.svg)]({real_stack.public_url}/v2/image/default)"
    )
    shot(page, "02-form-progress")
    page.wait_for_url(LAB)
    expect(page.locator("#jp-main-dock-panel")).to_be_visible()
    shot(page, "03-jupyterlab-from-image")


def test_form_launches_a_repository_into_jupyterlab(
    page: Page, real_stack: Stack, git_server: GitServer
) -> None:
    git_server.commit("browser-repo", {"requirements.txt": "", "hello.ipynb": _NOTEBOOK})
    page.goto(f"{real_stack.public_url}/")
    page.get_by_label("Repository URL").fill(git_server.url("browser-repo"))
    page.get_by_label("Branch, tag or commit").fill("main")
    page.get_by_label("Open this file or path").fill("hello.ipynb")
    page.get_by_role("button", name="Launch").click()
    expect(page.locator("#log")).to_contain_text("Fetching")
    shot(page, "04-form-build-log")
    page.wait_for_url(re.compile(r".*/lab/tree/hello\.ipynb.*"))
    expect(page.locator(".jp-Notebook")).to_be_visible()
    shot(page, "05-jupyterlab-from-repository")


def test_v2_link_then_ended_page_then_launch_again(page: Page, real_stack: Stack) -> None:
    page.goto(f"{real_stack.public_url}/v2/image/default")
    page.wait_for_url(LAB)
    first_user = user_of(page)
    shot(page, "06-v2-link")

    with httpx.Client(base_url=real_stack.public_url, timeout=30) as api:
        launch_id = _launch_of(real_stack, first_user)
        assert api.delete(f"/api/launches/{launch_id}").status_code == 202
        wait_for(lambda: api.get(f"/api/launches/{launch_id}").json()["status"] == "ended", 60)

    page.goto(f"{real_stack.public_url}/user/{first_user}/lab")
    expect(page.get_by_role("heading", name="This session has ended")).to_be_visible()
    expect(page.locator("#why")).to_have_text("It was ended on request.")
    shot(page, "07-session-ended")
    page.get_by_role("link", name="Launch again").click()
    page.wait_for_url(LAB)
    assert user_of(page) != first_user
    shot(page, "08-launched-again")


def test_a_binder_client_on_another_origin_runs_code(page: Page, real_stack: Stack) -> None:
    port = free_port()
    site = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            str(port),
            "--directory",
            str(Path(__file__).parent),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/"), 10, "the docs site")
        page.goto(f"http://127.0.0.1:{port}/thebe_like.html?binder={real_stack.public_url}")
        expect(page.locator("#output")).to_have_text("2", timeout=60_000)
        expect(page.locator("#status")).to_have_text("done")
        shot(page, "09-binder-client-1-plus-1")
    finally:
        site.terminate()
        site.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _launch_of(stack: Stack, user: str) -> str:
    from sqlalchemy import select

    from worker.db import session_scope
    from worker.models import Launch

    with session_scope(stack.config.database_url) as db:
        return db.scalars(select(Launch.id).where(Launch.hub_user == user)).one()


_NOTEBOOK = """{"cells": [{"cell_type": "markdown", "metadata": {},
 "source": ["# Hello from a repo"]}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}"""
