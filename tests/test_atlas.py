"""The cluster atlas, a person's mapping from it, and the page in a real browser (headless
Chromium from Debian's packages, driven by Selenium; `.ci/run` installs it)."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from core.clustering.fit_artifact import FitArtifact
from core.mapping.human import HumanMappingError, load_human_mapping, mapping_document
from core.reporting.atlas import EXAMPLES, THUMB, patch_box, render_html, thumbnail
from ray_jobs.apply import run_apply
from ray_jobs.pipeline import Pipeline
from tests.tiny_runs import copy_run, tiny_config

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def small_fit(k=4, seed=0) -> FitArtifact:
    c = np.random.default_rng(seed).normal(size=(k, 8)).astype(np.float32)
    return FitArtifact(
        c / np.linalg.norm(c, axis=1, keepdims=True),
        np.arange(k) % 3,
        "majority",
        {},
        {"mapping_counts": np.ones((2, k, 19), np.int64)},
    )


def test_a_thumbnail_outlines_its_patch_with_context_and_pads_the_edge():
    image = np.zeros((40, 80, 3), np.uint8)
    image[10:20, 20:30] = 200  # patch (1, 2) of a 4 x 8 grid of 10 px patches
    box = patch_box(1, 2, (4, 8), (40, 80))
    assert box == (10.0, 20.0, 20.0, 30.0)
    thumb = thumbnail(image, box)
    assert thumb.shape == (THUMB, THUMB, 3) and thumb.dtype == np.uint8
    assert (thumb[THUMB // 2, THUMB // 2] == 200).all()  # the patch in the middle
    outlined = (thumb == [255, 230, 0]).all(axis=2)
    assert outlined[THUMB // 2].sum() == 2 and outlined.any(axis=1).sum() > THUMB / 2 * 0.3
    corner = thumbnail(image, patch_box(0, 0, (4, 8), (40, 80)))
    assert (corner[0, 0] == 96).all()  # beyond the image edge: grey


def test_a_mapping_is_refused_unless_made_for_this_very_fit(tmp_path):
    fit = small_fit()
    doc = mapping_document(fit, np.array([1, 1, 2, 255]), [0, 3])
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(doc))
    assert load_human_mapping(path, fit, tmp_path).tolist() == [1, 1, 2, 255]
    cases = {
        "another fit": (mapping_document(small_fit(seed=1), fit.mapping, []), "made for another fit"),
        "another k": ({**doc, "k": 5}, "made for another fit"),
        "a cluster left out": ({**doc, "mapping": {"0": 1, "1": 1, "2": 2}}, r"missing \['3'\]"),
        "not a trainId": ({**doc, "mapping": {**doc["mapping"], "2": 19}}, "cluster 2 -> 19"),
        "not a mapping": ({"k": 4}, "is not a cluster mapping"),
    }
    for bad, message in cases.values():
        path.write_text(json.dumps(bad))
        with pytest.raises(HumanMappingError, match=message):
            load_human_mapping(path, fit, tmp_path)
    for text in ("{not json", "[" * 100_000 + "]" * 100_000):  # the second nests deeper than the parser recurses
        path.write_text(text)
        with pytest.raises(HumanMappingError, match="not readable JSON"):
            load_human_mapping(path, fit, tmp_path)
    twice = json.dumps(doc).replace('"mapping": {"0": 1,', '"mapping": {"0": 255, "0": 1,')
    path.write_text(twice)
    with pytest.raises(HumanMappingError, match="key '0' appears more than once"):
        load_human_mapping(path, fit, tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())  # a byte-order mark, as some editors save
    assert load_human_mapping(path, fit, tmp_path).tolist() == [1, 1, 2, 255]
    with pytest.raises(HumanMappingError, match="does not exist"):
        load_human_mapping(tmp_path / "none.json", fit, tmp_path)


def test_a_clusters_share_counts_the_pixels_its_patches_cover():
    from ray_jobs.atlas import _shard_members
    from storage.features import patch_schema, patch_table

    small, large = np.zeros((2, 4, 4)), np.zeros((2, 4, 4))
    small[0], large[1] = 1, 1  # the small image's patches go to cluster 0, the large one's to cluster 1
    table = patch_table(
        ["small", "large"],
        [small, large],
        [np.zeros((4, 4), np.uint8)] * 2,
        patch_schema(2, "float32"),
        [(56, 56), (112, 112)],
    )
    found = _shard_members(table, 0, np.eye(2, dtype=np.float32), 0)
    assert found["patches"].tolist() == [16, 16] and found["pixels"].tolist() == [56 * 56, 112 * 112]


def test_the_page_data_cannot_close_its_script_element():
    page = render_html([], small_fit(), {"fit": "k4</script><script>alert(1)</script>", "run": "/tmp/run<!--<script>"})
    assert (
        page.count("</script>") == 2 and page.count("<script") == 2 and "<!--" not in page
    )  # the data's own are escaped


@pytest.fixture(scope="module")
def atlas_run(tiny_run, tmp_path_factory):
    """The shared tiny run, copied, with every stage again: only the atlas of its main fit (and the
    report that links it) is new."""
    cfg = copy_run(tiny_run, tmp_path_factory.mktemp("atlas_run"), atlas={"enabled": True})
    Pipeline(cfg).run()
    return cfg, cfg.output_dir


def test_the_run_writes_an_atlas_of_every_cluster_linked_from_the_report(atlas_run):
    cfg, out = atlas_run
    fit = FitArtifact.load(out / "fits" / "k16")
    data = json.loads((out / "atlas" / "atlas.json").read_text())
    cards = data["cards"]
    assert [c["cluster"] for c in cards] == list(range(fit.k))
    assert sum(c["patches"] for c in cards) == 12 * 8 * 16  # every patch of every image, once
    assert all(np.isclose(c["share"], c["patches"] / (12 * 8 * 16)) for c in cards)  # images of one size
    assert all(c["examples"] == min(EXAMPLES, c["patches"]) for c in cards)
    assert all(c["class"] == fit.mapping[c["cluster"]] for c in cards)
    sprite = Image.open(out / "atlas" / "sprites" / "sprite-000.jpg")
    assert sprite.size == (EXAMPLES * THUMB, fit.k * THUMB)
    assert "atlas/index.html" in (out / "report.md").read_text()
    few = json.loads((out / "report.json").read_text())["fits"]["k16"]["pixel_level"]["few_shot"]
    assert set(few) == {"1", "3", "9", "27"} and all(0 <= v["miou_mean"] <= 1 for v in few.values())
    assert (out / "figures" / "few_shot.png").is_file()


def test_the_atlas_command_writes_another_fits_atlas_beside_the_run_and_refuses_bad_paths(atlas_run, tmp_path, capsys):
    import submit

    cfg, out = atlas_run
    assert submit.main(["atlas", "--fit", str(out / "fits" / "k8")]) == 0
    cards = json.loads((out / "atlas_k8" / "atlas.json").read_text())["cards"]
    assert len(cards) == 8 and (out / "atlas_k8" / "index.html").is_file()
    (tmp_path / "a_file").write_text("")
    assert submit.main(["atlas", "--fit", str(out / "fits" / "k8"), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    for inside in (out, out / "features", out / "fits" / "k16"):
        assert submit.main(["atlas", "--fit", str(out / "fits" / "k8"), "--out", str(inside)]) == 2
        assert "is the run's own folder or one of its stages' folders" in capsys.readouterr().err
    assert submit.main(["atlas", "--fit", str(out / "fits")]) == 2
    assert "is not a fit folder of a run" in capsys.readouterr().err
    # inside the run's dataset, however spelt: its sprite JPEGs would become images of the dataset
    (tmp_path / "data_link").symlink_to(cfg.dataset.root)
    for inside in (tmp_path / "data_link" / "atlas", Path(cfg.dataset.root) / "leftImg8bit" / ".." / "atlas"):
        assert submit.main(["atlas", "--fit", str(out / "fits" / "k8"), "--out", str(inside)]) == 2
        err = capsys.readouterr().err
        assert f"lies inside dataset.root={cfg.dataset.root}: what is written there would be read as input" in err
        assert "Put --out outside" in err
    assert not (Path(cfg.dataset.root) / "atlas").exists()
    assert submit.main(["atlas", "--fit", str(out / "fits" / "k99")]) == 2
    assert "is not one of this run's fits" in capsys.readouterr().err


def test_the_atlas_command_runs_from_any_directory_and_takes_the_dataset_under_another_path(
    atlas_run, tmp_path, monkeypatch
):
    import submit

    cfg, out = atlas_run
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert all(Path(p).is_absolute() for p in (recorded["output_dir"], recorded["dataset"]["root"]))
    mounted = tmp_path / "mounted"  # the same images under another path: the same dataset
    mounted.symlink_to(recorded["dataset"]["root"])
    monkeypatch.chdir(tmp_path)
    assert (
        submit.main(
            ["atlas", "--fit", str(out / "fits" / "k16"), "--out", "elsewhere", "--set", f"dataset.root={mounted}"]
        )
        == 0
    )
    assert json.loads((tmp_path / "elsewhere" / "failed_items.json").read_text()) == []
    assert (tmp_path / "elsewhere" / "sprites" / "sprite-000.jpg").read_bytes() == (
        out / "atlas" / "sprites" / "sprite-000.jpg"
    ).read_bytes()  # the run's own atlas, byte for byte


def test_an_image_unreadable_at_atlas_time_is_listed_and_the_rest_is_written(atlas_run, tmp_path):
    import dataclasses

    from ray_jobs.atlas import run_atlas
    from storage.run.feature_sets import FeatureShards
    from storage.run.markers import read_done

    cfg, out = atlas_run
    records = Pipeline(cfg).records
    bad = tmp_path / "truncated.png"
    bad.write_bytes(Path(records[0].image_path).read_bytes()[:100])
    records = [dataclasses.replace(records[0], image_path=str(bad)), *records[1:]]
    run_atlas(
        cfg,
        out / "fits" / "k16",
        out / "fits" / "baseline_k19",
        FeatureShards(out / "features", read_done(out / "features")),
        records,
        tmp_path / "atlas",
    )
    (failed,) = json.loads((tmp_path / "atlas" / "failed_items.json").read_text())
    assert failed["image_id"] == records[0].image_id and "truncated.png" in failed["error"]
    cards = json.loads((tmp_path / "atlas" / "atlas.json").read_text())["cards"]
    assert [c["patches"] for c in cards] == [
        c["patches"] for c in json.loads((out / "atlas" / "atlas.json").read_text())["cards"]
    ]
    assert (tmp_path / "atlas" / "index.html").is_file()


def test_a_human_mapping_labels_and_is_scored_as_its_own_protocol_and_another_fits_is_refused(
    atlas_run, demo_root, tmp_path
):
    cfg, out = atlas_run
    fit = FitArtifact.load(out / "fits" / "k16")
    everything_road = mapping_document(fit, np.zeros(fit.k, np.int64), list(range(fit.k)))
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(everything_road))
    run = tmp_path / "human"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("scores", "labels", "report.*", "atlas", ".lock*"))
    Pipeline(tiny_config(demo_root, run, label={"human_mapping": str(path)})).run(("label", "report"))
    level = json.loads((run / "report.json").read_text())["fits"]["k16"]["pixel_level"]
    road = level["human"]["per_class_iou"]
    assert road["road"] is not None and all(v in (None, 0.0) for name, v in road.items() if name != "road")
    assert level["same_set"] == json.loads((out / "report.json").read_text())["fits"]["k16"]["pixel_level"]["same_set"]
    train_ids = np.asarray(Image.open(next((run / "labels").rglob("*_trainIds.png"))))
    assert set(np.unique(train_ids)) <= {0, 255}  # the written labels use the person's mapping

    applied = run_apply(
        tiny_config(demo_root, tmp_path / "applied", dataset={"max_images": 2}), out / "fits" / "k16", path
    )
    assert applied["mapping_kind"] == "human" and applied["human_mapping"] == str(path)
    other = mapping_document(FitArtifact.load(out / "fits" / "k8"), np.zeros(8, np.int64), [])
    path.write_text(json.dumps(other))
    with pytest.raises(HumanMappingError, match="made for another fit"):
        run_apply(tiny_config(demo_root, tmp_path / "refused", dataset={"max_images": 2}), out / "fits" / "k16", path)


@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
def test_the_atlas_in_a_real_browser_renders_every_card_and_exports_the_names_chosen(atlas_run, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cfg, out = atlas_run
    fit = FitArtifact.load(out / "fits" / "k16")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1300,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get((out / "atlas" / "index.html").as_uri())
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert len(cards) == fit.k
        thumbs = driver.find_elements(By.CSS_SELECTOR, ".thumb")
        assert len(thumbs) == sum(
            min(EXAMPLES, c["patches"]) for c in json.loads((out / "atlas" / "atlas.json").read_text())["cards"]
        )
        sprites = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const urls = [...new Set([...document.querySelectorAll('.thumb')].map(
                t => getComputedStyle(t).backgroundImage.slice(5, -2)))];
            Promise.all(urls.map(u => new Promise(ok => { const i = new Image(); i.onload = () => ok(i.naturalWidth);
                                                          i.onerror = () => ok(0); i.src = u; }))).then(done);""")
        assert sprites and all(width == EXAMPLES * THUMB for width in sprites)
        shot = out / "atlas" / "screenshot.png"
        driver.save_screenshot(str(shot))

        def pick(cluster, value):
            card = driver.find_element(By.CSS_SELECTOR, f'.card[data-cluster="{cluster}"]')
            Select(card.find_element(By.CSS_SELECTOR, ".picker")).select_by_value(value)

        # cluster 2 -> person, cluster 5 -> ignore, cluster 7 keeps its fitted class (confirmed: named, unchanged)
        chosen = {2: 11, 5: 255, 7: int(fit.mapping[7])}
        for cluster, train_id in chosen.items():
            pick(cluster, str(train_id))
        pick(9, "0")
        pick(9, "")  # named, then "not named" again
        assert "3 named by you" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "unnamed").click()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cards .card")) == fit.k - 3
        driver.refresh()  # the names persist in localStorage
        assert "3 named by you" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "export").click()
        exported = downloads / "mapping.json"
        for _ in range(100):
            if exported.exists():
                break
            time.sleep(0.1)
        doc = json.loads(exported.read_text())
    finally:
        driver.quit()
    changed = {int(c): t for c, t in doc["mapping"].items() if t != fit.mapping[int(c)]}
    assert changed == {c: t for c, t in chosen.items() if t != fit.mapping[c]} and doc["named"] == sorted(chosen)
    path = tmp_path / "mapping.json"
    path.write_text(exported.read_text())
    mapping = load_human_mapping(path, fit, out / "fits" / "k16")
    assert [mapping[c] for c in chosen] == list(chosen.values())
    assert shot.stat().st_size > 10_000
