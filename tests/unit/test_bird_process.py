"""Config writing and process guards that need the bird binaries but no daemon, namespace or root."""

import os
import shutil

import pytest

from netplugin.errors import InvalidInput
from netplugin.routing.bird import BirdConfigWriter, BirdError, BirdProcess, bgp_status
from netplugin.routing.bird_config import render_bird_config
from netplugin.routing.model import BgpNode, RoutingInput

pytestmark = pytest.mark.skipif(shutil.which("bird") is None, reason="bird not installed")

NODE = BgpNode("host-1", "10.99.0.1")


def config(blocks=("10.1.1.0/26",)):
    return render_bird_config(RoutingInput(node=NODE, nodes=(NODE,), blocks=blocks))


def test_writer_without_running_bird(tmp_path):
    bird = BirdProcess(str(tmp_path / "run"), netns="npt-unused")
    writer = BirdConfigWriter(bird)
    assert writer.apply(config()) is True
    assert open(bird.conf_path).read() == config()
    assert writer.apply(config()) is False  # unchanged: nothing done

    with pytest.raises(InvalidInput, match="BIRD rejected config"):
        writer.apply(config() + "protocol bogus {}\n")
    assert open(bird.conf_path).read() == config()  # the old config stays
    assert os.listdir(bird.run_dir) == ["bird.conf"]  # no temporary file left behind

    assert writer.apply(config(("10.1.1.0/26", "10.1.1.64/26"))) is True
    assert "route 10.1.1.64/26 blackhole;" in open(bird.conf_path).read()


def test_birdc_on_missing_socket_is_a_clear_error(tmp_path):
    with pytest.raises(BirdError, match="BIRD is not running"):
        bgp_status(str(tmp_path / "bird.ctl"))


def test_start_refuses_without_config_or_with_too_long_socket_path(tmp_path):
    with pytest.raises(BirdError, match="no config"):
        BirdProcess(str(tmp_path), netns="npt-unused").start()
    deep = tmp_path / ("d" * 100)
    bird = BirdProcess(str(deep), netns="npt-unused")
    BirdConfigWriter(bird).apply(config())
    with pytest.raises(BirdError, match="longer than 107 bytes"):
        bird.start()
    assert bird.pid() is None


def test_netns_argument_is_required(tmp_path):
    with pytest.raises(TypeError):
        BirdProcess(str(tmp_path))  # a forgotten namespace must not mean the host's
