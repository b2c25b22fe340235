"""The runs browser page of `lmforge ui` (lmforge/web/static/runs.*, plot.js) in headless Chromium
against the real app: the list, a run's report card with its curves, evaluation items and data
statistics, the comparison of two runs, damaged runs, the API key, and run files written to
inject HTML or script into the page.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from test_runs_api import (
    eval_dir,
    make_broken_run,
    make_full_run,
    make_pretrain_run,
    train_metrics,
    write_jsonl,
)

from lmforge.web.runs import create_runs_app

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture then skips these tests (fails them under CI)
    expect = None

EVIL = "<img src=x onerror=window.__pwned=1>"
SCRIPT = "<script>window.__pwned=1</script>"


@pytest.fixture(scope="module")
def site(tmp_path_factory, serve_app):
    root = tmp_path_factory.mktemp("runs")
    make_full_run(root / "full")
    make_pretrain_run(root / "pre")
    make_broken_run(root / "broken")
    with serve_app(create_runs_app(root)) as (url, _):
        yield url


def stage(page, name: str):
    return page.locator(f'section[data-stage="{name}"]')


def line(scope, series: str):
    return scope.locator(f'path[data-testid="plot-line"][data-series="{series}"]')


def points_in(path) -> int:
    """How many points an SVG path joins (its M and L commands)."""
    return len(re.findall(r"[ML]", path.get_attribute("d")))


def test_list_then_run_with_curves_eval_items_and_data(page, site):
    page.goto(site)
    rows = page.get_by_test_id("run-row")
    expect(rows).to_have_count(3)
    page.get_by_test_id("filter").fill("brok")
    expect(page.locator('[data-testid="run-row"]:visible')).to_have_count(1)
    page.get_by_test_id("filter").fill("")
    full = page.locator('[data-testid="run-row"][data-path="full"]')
    expect(full).to_contain_text("2.2")  # its val_loss
    full.get_by_test_id("run-link").click()
    expect(page.get_by_test_id("run-title")).to_have_text("full")
    expect(page.get_by_test_id("headline")).to_contain_text("reading acc")

    pretrain = stage(page, "pretrain")
    loss = pretrain.locator('[data-chart="loss"]')
    expect(line(loss, "loss")).to_have_attribute("data-points", "40")
    assert points_in(line(loss, "loss")) == 40
    expect(line(loss, "val_loss")).to_have_attribute("data-points", "4")
    expect(line(pretrain.locator('[data-chart="learning rate"]'), "lr")).to_have_count(1)
    # Against tokens, smoothed, on a log scale: still every point.
    loss.get_by_test_id("plot-x").select_option("tokens")
    loss.get_by_test_id("plot-log").check()
    loss.get_by_test_id("plot-smooth").evaluate(
        "(e) => { e.value = '0.6'; e.dispatchEvent(new Event('input')); }"
    )
    expect(line(loss, "loss")).to_have_attribute("data-points", "40")
    loss.locator("svg").hover()
    expect(loss.locator(".lmplot-tip")).to_contain_text("tokens")
    loss.locator('[data-testid="legend-item"][data-series="val_loss"]').click()
    expect(line(loss, "val_loss")).to_have_count(0)
    other = pretrain.locator('[data-chart="other"]')
    other.get_by_test_id("other-key").select_option("elapsed")
    expect(line(other, "elapsed")).to_have_attribute("data-points", "40")

    ev = stage(page, "eval")
    expect(ev.get_by_test_id("eval-table")).to_contain_text("0.5 ± 0.1")
    ev.locator('[data-testid="eval-task"][data-task="cloze"]').click()
    samples = ev.get_by_test_id("sample")
    expect(samples).to_have_count(5)
    expect(samples.first.get_by_test_id("sample-prompt")).to_have_text("cloze question 0?\nAnswer:")
    expect(samples.first.get_by_test_id("sample-gold")).to_have_text("right 0")
    ev.get_by_test_id("samples-next").click()
    expect(ev.get_by_test_id("samples-status")).to_have_text("samples of cloze: 6–7 of 7")
    expect(samples.first.get_by_test_id("sample-pred")).to_have_text("wrong 5")

    expect(stage(page, "data").get_by_test_id("data-table")).to_contain_text("duplicate 8")
    sft = stage(page, "sft")  # generations of SFT: loaded when opened
    sft.locator("summary", has_text="samples").click()
    expect(sft.get_by_test_id("sample-gold")).to_have_text("4")
    expect(sft.get_by_test_id("sample")).to_contain_text("correct true")
    config = pretrain.get_by_test_id("config")
    config.locator("summary").click()
    expect(config.locator("pre")).to_contain_text("lr: 0.01")
    expect(page.get_by_test_id("report")).to_contain_text("optimizer steps")
    expect(page.locator("img.report-image")).to_have_attribute("src", re.compile("^data:image/png"))
    assert page.errors == []


def test_compare_two_runs_on_one_plot(page, site):
    page.goto(site)
    for path in ("full", "pre"):
        page.locator(f'[data-testid="run-row"][data-path="{path}"]').get_by_test_id(
            "run-select"
        ).check()
    page.get_by_test_id("compare-button").click()
    expect(page).to_have_url(re.compile("#/compare/full,pre$"))
    plot = page.get_by_test_id("compare-plot")
    expect(plot.locator('[data-testid="plot-line"]')).to_have_count(2)
    expect(line(plot, "full")).to_have_attribute("data-points", "40")
    expect(line(plot, "pre")).to_have_attribute("data-points", "25")
    page.get_by_test_id("compare-metric").select_option("val_loss")
    expect(line(plot, "pre")).to_have_attribute("data-points", "5")
    diff = page.get_by_test_id("config-diff")
    expect(diff).to_contain_text("train.lr")
    expect(diff).to_contain_text("0.003")
    assert page.errors == []


def test_damaged_run_shows_what_is_missing_and_the_rest(page, site):
    page.goto(site + "/#/run/broken")
    states = '[data-testid="problems"] [data-testid="file-state"]'
    for file, state in (
        ("report.md", "missing"),
        ("samples.jsonl", "missing"),
        ("run.yaml", "unreadable"),
        ("summary.json", "unreadable"),
        ("results.json", "unreadable"),
    ):
        badge = page.locator(f'{states}[data-file="{file}"]')
        expect(badge).to_have_attribute("data-state", state)
    expect(page.get_by_test_id("bad-lines")).to_contain_text("4 unreadable lines")
    expect(line(stage(page, "pretrain"), "loss")).to_have_attribute("data-points", "27")
    page.goto(site)
    broken = page.locator('[data-testid="run-row"][data-path="broken"]')
    expect(broken).to_contain_text("problems")
    assert page.errors == []


def test_plot_handles_gaps_lengths_and_log_of_non_positive(page, site):
    page.goto(site)
    expect(page.get_by_test_id("run-row").first).to_be_visible()
    result = page.evaluate(
        """() => {
          const box = document.createElement("div");
          document.body.append(box);
          const chart = LmPlot.create(box, {series: [
            {name: "gappy", y: [1, null, 3, NaN, 5, 6], x: {step: [1, 2, 3, 4, 5, 6]}},
            {name: "short", y: [0, -1, 2], x: {step: [1, 50, 100]}},
          ]});
          const read = () => [...box.querySelectorAll('[data-testid="plot-line"]')].map(
            (p) => [p.dataset.series, p.dataset.points, (p.getAttribute("d").match(/M/g) || []).length]);
          const linear = read();
          box.querySelector('[data-testid="plot-log"]').click();
          return {linear, log: read(), format: [51309, 0.000012, 3.14159, 2e9].map(LmPlot.format)};
        }"""
    )
    assert result["linear"] == [["gappy", "4", 3], ["short", "3", 1]]
    assert result["log"] == [["gappy", "4", 3], ["short", "1", 1]]  # 0 and -1 cannot be drawn
    assert result["format"] == ["51.3k", "1.2e-5", "3.142", "2G"]
    assert page.errors == []


def test_api_key_is_asked_for_and_kept_for_the_tab(page, tmp_path, serve_app):
    make_pretrain_run(tmp_path / "pre")
    with serve_app(create_runs_app(tmp_path, api_key="sk-ui")) as (url, _):
        page.goto(url)
        expect(page.get_by_test_id("key-form")).to_be_visible()
        page.get_by_test_id("key-input").fill("wrong")
        page.get_by_test_id("key-input").press("Enter")
        expect(page.get_by_test_id("key-form")).to_contain_text("incorrect or missing API key")
        page.get_by_test_id("key-input").fill("sk-ui")
        page.get_by_test_id("key-input").press("Enter")
        expect(page.get_by_test_id("run-row")).to_have_count(1)
        page.get_by_test_id("run-link").click()
        expect(line(stage(page, "pretrain"), "loss")).to_have_attribute("data-points", "25")
    assert page.errors and all("401" in e for e in page.errors)  # the two refused requests


def test_text_from_run_files_cannot_inject_html_or_script(page, tmp_path, serve_app):
    run = tmp_path / EVIL
    run.mkdir()
    (run / "run.yaml").write_text(yaml.safe_dump({"note": SCRIPT, "train": {"lr": 0.01}}))
    write_jsonl(run / "metrics.jsonl", [{**r, EVIL: 1.0} for r in train_metrics(10, 0.01)])
    (run / "tags.json").write_text(json.dumps([SCRIPT]))
    (run / "report.md").write_text(
        f"# {SCRIPT}\n\n[click me](javascript:window.__pwned=1) and {EVIL}\n\n"
        "[also](JaVaScRiPt:window.__pwned=1) ![x](javascript:window.__pwned=1)\n"
    )
    eval_dir(run / "eval", {"t": 3}, task_name=lambda t: SCRIPT + t, prediction=EVIL)
    make_pretrain_run(tmp_path / "plain")
    with serve_app(create_runs_app(tmp_path)) as (url, _):
        page.goto(url)
        link = page.get_by_test_id("run-link").filter(has_text="img")
        expect(link).to_have_text(EVIL)
        expect(page.get_by_test_id("run-row").first).to_contain_text(SCRIPT)  # the tag
        link.click()
        expect(page.get_by_test_id("run-title")).to_have_text(EVIL)
        report = page.get_by_test_id("report")
        expect(report.locator("h1")).to_have_text(SCRIPT)
        expect(report).to_contain_text("[click me](javascript:window.__pwned=1)")
        expect(report).to_contain_text(EVIL)
        page.get_by_text("click me").first.click()
        task = page.get_by_test_id("eval-task")
        expect(task).to_have_text(SCRIPT + "t")
        task.click()
        expect(page.get_by_test_id("sample-pred").nth(1)).to_have_text(EVIL)
        config = stage(page, "pretrain").get_by_test_id("config")
        config.locator("summary").click()
        expect(config.locator("pre")).to_contain_text(SCRIPT)
        other = stage(page, "pretrain").get_by_test_id("other-key")
        other.select_option(EVIL)
        expect(page.locator(f'[data-testid="legend-item"][data-series="{EVIL}"]')).to_have_count(1)
        page.goto(url)
        page.get_by_test_id("run-select").nth(0).check()
        page.get_by_test_id("run-select").nth(1).check()
        page.get_by_test_id("compare-button").click()
        expect(page.get_by_test_id("config-diff")).to_contain_text(SCRIPT)
        expect(page.get_by_test_id("compare-plot").locator("path")).to_have_count(2)
        assert page.locator("img[src=x], script:not([src])").count() == 0
        assert page.locator('a[href^="javascript" i]').count() == 0
        assert page.evaluate("window.__pwned") is None
    assert page.errors == []
