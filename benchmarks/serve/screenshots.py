"""Screenshots of the ``vitkit serve`` page for two families, taken in headless Chromium: ``docs/serve/*.png``.

Short real runs on MNIST digits (one epoch of ``configs/mnist_nest.yaml`` and of ``configs/mnist_mobilevit.yaml``
on 2,000 digits; reused when present) are served in-process; the page picks a held-out digit, clicks a pixel on
it and shows that pixel's attention (NesT: level 0, whose attention stays inside the query's block; MobileViT: a
transformer layer of its last stage, whose attention runs along the patch sequence of the pixel's position in
each 2x2 patch); the NesT page is also shown with GradCAT's path and the attention distance plot, the
MobileViT page with its CAM.

    python benchmarks/serve/screenshots.py       # needs Chromium + chromedriver (Debian: chromium chromium-driver)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def train(recipe: str, run: Path, mnist: Path) -> Path:
    if (run / "checkpoints" / "best" / "model.safetensors").is_file():
        return run
    sets = [f"data.root={mnist}", "data.train_split=test[:2000]", "data.val_split=test[9000:]", "sched.epochs=1",
            "sched.warmup_epochs=0", "train.progress=false", "train.threads=1", f"train.output={run}"]  # fmt: skip
    cmd = [sys.executable, "-m", "vitkit", "train", "--config", str(REPO / "configs" / recipe)]
    subprocess.run(cmd + sum([["--set", s] for s in sets], []), check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return run


def chromium(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def shoot(run: Path, index: int, pixel: tuple[int, int], layer: int, out: Path, extra: list[tuple[str, str]]) -> None:
    """Serve ``run``, pick held-out image ``index``, click input ``pixel`` (y, x), show ``layer``, screenshot to
    ``out``; then for each ``(method, file)`` in ``extra`` choose that method and screenshot to ``file``."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from vitkit.serve import Explorer, create_app, start_in_thread

    url, stop = start_in_thread(create_app(Explorer.load(str(run))))
    driver = chromium(1440, 800)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(url)
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        driver.find_element(By.ID, "held-out").clear()
        driver.find_element(By.ID, "held-out").send_keys(str(index))
        driver.find_element(By.ID, "pick").click()
        wait.until(lambda d: "held-out image" in d.find_element(By.ID, "truth").text)
        view = driver.find_element(By.ID, "view")
        size = driver.execute_script("return state.image.size")
        s = 384 / max(size)
        ActionChains(driver).move_to_element_with_offset(
            view, int((pixel[1] + 0.5) * s) - 192, int((pixel[0] + 0.5) * s) - 192
        ).click().perform()
        wait.until(lambda d: view.get_attribute("data-overlay") == "attention")
        driver.execute_script(
            "const l = document.getElementById('layer'); l.value = arguments[0]; l.dispatchEvent(new Event('input'))",
            layer,
        )
        name = driver.execute_script("return state.info.layers[arguments[0]].name", layer)
        wait.until(lambda d: name in d.find_element(By.ID, "message").text)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"wrote {out}")
        for method, path in extra:
            Select(driver.find_element(By.ID, "method")).select_by_value(method)
            if method == "distance":  # a plot beside the image, no overlay
                wait.until(lambda d: d.find_element(By.ID, "plot").get_attribute("data-points"))
            else:
                wait.until(lambda d, m=method: view.get_attribute("data-overlay") == m)
            driver.save_screenshot(str(path))
            print(f"wrote {path}")
    finally:
        driver.quit()
        stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "serve-bench")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "serve")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    nest = train("mnist_nest.yaml", args.work / "nest", args.mnist)
    mobilevit = train("mnist_mobilevit.yaml", args.work / "mobilevit", args.mnist)
    extra = [("gradcat", args.out / "nest_gradcat.png"), ("distance", args.out / "nest_distance.png")]
    shoot(nest, 3, (9, 22), 0, args.out / "nest_attention.png", extra)
    shoot(mobilevit, 3, (18, 44), 4, args.out / "mobilevit_attention.png", [("cam", args.out / "mobilevit_cam.png")])


if __name__ == "__main__":
    main()
