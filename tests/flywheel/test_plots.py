import base64

from flywheel.plots import data_url, round_plot


def test_round_plot_writes_a_png_the_run_page_can_inline(tmp_path):
    import matplotlib.image

    path = round_plot({"all_lowercase": 0.5, "no_commas": 0.25}, {"all_lowercase": 0.75, "word_count": 1.0},
                      [(2, 0.6), (1, 0.7), (3, 0.55)], "tiny round-0001", tmp_path / "plots" / "r.png")
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 1000  # 12 inches at 100 dpi: both panels
    url = data_url(path)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == path.read_bytes()


def test_round_plot_without_a_loss_curve(tmp_path):
    path = round_plot({}, {"all_lowercase": 1.0}, [], "no steps logged", tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
