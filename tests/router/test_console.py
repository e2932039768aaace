"""The on-call console (``GET /console``) in headless Chromium against the real API: lanes,
workers, recent jobs with thumbnails and the audit log show; a rollback is confirmed with a
reason and appears in the audit list. Screenshots go to ``tmp_path/screenshots`` and are
copied to ``tests/output/console/`` (git-ignored)."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from controlplane.policy import Policy
from controlplane.policy_loader import parse_policy
from controlplane.registry import Registry
from tests.conftest import POLICIES, REPO
from tests.router.conftest import Router, running_router

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS_COPY = REPO / "tests" / "output" / "console"
TOKEN = "console-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "console-model"
ACTOR = "on-call-tester"
REASON = "canary p95 doubled after the 14:02 deploy"
#: a prompt that would run script or add elements if the page rendered it as HTML
HOSTILE_PROMPT = '<img src=x onerror="document.title=\'pwned\'"><b>bold</b> lighthouse'
WAIT_S = 30

needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"the console's browser test needs {CHROMIUM} and {CHROMEDRIVER} "
           "(apt-get install chromium chromium-driver)")


def console_policy() -> Policy:
    """The simulated lane, plus an engine on a registry model so that it has a deployment
    (no route uses it and no worker serves it: only its deployment matters here)."""
    text = (POLICIES / "sim_lane.yaml").read_text().replace("routes:", f"""\
  render: {{kind: diffusers.text2image, model: {MODEL}, steps: 1}}
routes:""", 1)
    return parse_policy(text)


def register(registry: Registry, version: str, tmp_path: Path) -> None:
    """A registry version holding a placeholder weights file: nothing ever loads it."""
    source = tmp_path / f"weights-{version}"
    (source / "unet").mkdir(parents=True)
    (source / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"never loaded")
    registry.register(MODEL, version, source, kind="sdxl")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    register(registry, "1", tmp_path)
    return registry


@pytest.fixture
def shot(tmp_path: Path) -> Callable[[WebDriver, str], None]:
    """``shot(driver, name)``: a screenshot in tmp_path/screenshots, copied to the repo."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    SCREENSHOTS_COPY.mkdir(parents=True, exist_ok=True)

    def take(driver: WebDriver, name: str) -> None:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), f"no screenshot {path}"
        shutil.copy2(path, SCREENSHOTS_COPY / path.name)

    return take


async def submit_jobs(router: Router) -> list[str]:
    await router.start_worker("sim-draft")
    ids = []
    for prompt in (HOSTILE_PROMPT, "a lighthouse at dusk"):
        response = await router.submit(prompt=prompt, wait=WAIT_S)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "completed", response.text
        ids.append(response.json()["id"])
    return ids


async def test_the_page_loads_without_a_token_under_a_strict_csp(
        redis_url: str, registry: Registry, tmp_path: Path) -> None:
    async with running_router(redis_url, console_policy(), registry, tmp_path,
                              admin_token=TOKEN) as router:
        page = await router.http.get("/console")
        script = await router.http.get("/console/console.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert '<script src="/console/console.js"' in page.text
    assert script.status_code == 200 and "textContent" in script.text
    # the script never parses data as HTML (the browser test checks a hostile prompt too)
    assert not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write",
                         script.text)


async def test_recent_jobs_are_listed_newest_first_for_the_admin_only(
        redis_url: str, registry: Registry, tmp_path: Path) -> None:
    async with running_router(redis_url, console_policy(), registry, tmp_path,
                              admin_token=TOKEN) as router:
        ids = await submit_jobs(router)
        refused = await router.http.get("/v1/admin/jobs")
        listed = await router.http.get("/v1/admin/jobs", params={"limit": 5}, headers=ADMIN)
        one = await router.http.get("/v1/admin/jobs", params={"limit": 1}, headers=ADMIN)
        too_many = await router.http.get("/v1/admin/jobs", params={"limit": 1000},
                                         headers=ADMIN)
        image = await router.http.get(f"/v1/admin/jobs/{ids[0]}/images/0", headers=ADMIN)
    assert refused.status_code == 401
    assert listed.status_code == 200, listed.text
    assert [job["id"] for job in listed.json()] == ids[::-1]
    assert listed.json()[1]["prompt"] == HOSTILE_PROMPT
    assert [job["id"] for job in one.json()] == ids[-1:]
    assert too_many.status_code == 422 and "limit" in too_many.text
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def rows_text(driver: WebDriver, body_id: str) -> str:
    return driver.find_element(By.ID, body_id).text


def loaded_thumbnails(driver: WebDriver) -> int:
    return int(driver.execute_script(
        "return [...document.querySelectorAll('#jobs-body img.thumb')]"
        ".filter((img) => img.complete && img.naturalWidth > 0).length"))


def sim_lane(driver: WebDriver) -> tuple[int, str]:
    """The sim-draft lane's depth and its sparkline's title (``peak N over the last M
    samples``)."""
    row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#lanes-body tr")
               if r.text.startswith("sim-draft"))
    depth = int(row.find_elements(By.TAG_NAME, "td")[2].text)
    title = row.find_element(By.CSS_SELECTOR, "svg title").get_attribute("textContent")
    return depth, title or ""


def drive_console(base_url: str, shot: Callable[[WebDriver, str], None]) -> list[str]:
    """The on-call flow in the browser; returns the browser's console messages.

    Three more jobs are submitted while the page watches, so the lane's sparkline sees
    its depth rise and fall (the sim lane holds each job 1.5 s; the page polls every 2 s).
    """
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=ChromeService(str(CHROMEDRIVER)), options=options)
    wait = WebDriverWait(driver, WAIT_S, ignored_exceptions=[StaleElementReferenceException])
    try:
        driver.get(f"{base_url}/console")
        # without a token: lanes (with a sparkline of two polls or more), workers, deployments
        wait.until(lambda d: "sim-draft" in rows_text(d, "lanes-body"))
        with httpx.Client(base_url=base_url) as client:
            for _ in range(3):
                queued = client.post("/v1/images", json={"prompt": "a busy lane"})
                assert queued.status_code == 202, queued.text
        wait.until(lambda d: sim_lane(d)[0] > 0)
        wait.until(lambda d: sim_lane(d)[0] == 0 and sim_lane(d)[1].startswith("peak "))
        assert not sim_lane(driver)[1].startswith("peak 0"), sim_lane(driver)
        wait.until(lambda d: "sim-draft 0/" in rows_text(d, "workers-body"))
        wait.until(lambda d: "progressing 2" in rows_text(d, "deployments-body"))
        assert "admin token" in driver.find_element(By.ID, "audit-problem").text
        shot(driver, "1-without-token")

        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "actor").send_keys(ACTOR)
        driver.find_element(By.ID, "token-save").click()
        wait.until(lambda d: "rollout.start" in rows_text(d, "audit-body"))
        wait.until(lambda d: loaded_thumbnails(d) == 5)
        jobs = rows_text(driver, "jobs-body")
        assert HOSTILE_PROMPT.split(">")[0] in jobs  # shown as text, not as markup
        assert len(driver.find_elements(By.CSS_SELECTOR, "#jobs-body img")) == 5
        assert not driver.find_elements(By.CSS_SELECTOR, "#jobs-body b")
        assert driver.title == "Laneway console"
        assert "skipped" in jobs  # the verdict column (sim_lane verifies nothing)
        shot(driver, "2-with-token")

        wait.until(lambda d: d.find_element(
            By.CSS_SELECTOR, f'button[data-action="rollback"][data-model="{MODEL}"]')).click()
        confirm = driver.find_element(By.ID, "confirm")
        wait.until(lambda d: confirm.is_displayed())
        go = driver.find_element(By.ID, "confirm-go")
        assert not go.is_enabled(), "confirming must need a reason"
        assert "rollback" not in rows_text(driver, "audit-body")
        driver.find_element(By.ID, "confirm-reason").send_keys(REASON)
        assert go.is_enabled()
        shot(driver, "3-confirm-rollback")
        go.click()

        wait.until(lambda d: REASON in rows_text(d, "audit-body"))
        wait.until(lambda d: "aborted 2" in rows_text(d, "deployments-body"))
        assert f"rolled back {MODEL}" in driver.find_element(By.ID, "action-result").text
        newest = driver.find_element(By.CSS_SELECTOR, "#audit-body tr").text
        assert "rollback" in newest and ACTOR in newest and REASON in newest, newest
        shot(driver, "4-rolled-back")
        return [entry["message"] for entry in driver.get_log("browser")]
    finally:
        driver.quit()


@needs_chromium
async def test_on_call_rolls_back_from_the_console_with_a_reason(
        redis_url: str, registry: Registry, tmp_path: Path,
        shot: Callable[[WebDriver, str], None]) -> None:
    async with running_router(redis_url, console_policy(), registry, tmp_path,
                              admin_token=TOKEN) as router:
        await submit_jobs(router)
        register(registry, "2", tmp_path)
        started = await router.http.post("/v1/admin/rollouts", headers=ADMIN, json={
            "model": MODEL, "version": "2", "reason": "canary for the console test"})
        assert started.status_code == 201, started.text
        # the browser blocks its thread; the worker's heartbeats go on in this loop
        messages = await asyncio.to_thread(drive_console, str(router.http.base_url).rstrip("/"),
                                           shot)
        rollout = (await router.http.get(f"/v1/admin/rollouts/{MODEL}", headers=ADMIN)).json()
        audit = (await router.http.get("/v1/admin/audit", headers=ADMIN,
                                       params={"target": MODEL})).json()
    assert rollout["phase"] == "aborted"
    assert (audit[-1]["action"], audit[-1]["actor"], audit[-1]["reason"]) == (
        "rollback", ACTOR, REASON)
    assert not [m for m in messages if "Content Security Policy" in m], messages
    assert sorted(p.name for p in (tmp_path / "screenshots").iterdir()) == [
        "1-without-token.png", "2-with-token.png", "3-confirm-rollback.png",
        "4-rolled-back.png"]
