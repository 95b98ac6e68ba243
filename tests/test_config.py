"""The typed settings (deployments/config.py, serve_app/app.py): the files we ship validate, and a setting that
cannot work is refused with its name before anything starts."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from deployments.config import ClassifierConfig, IngressConfig, PreprocessorConfig
from serve_app.app import AppArgs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"Ingress": IngressConfig, "Preprocessor": PreprocessorConfig, "Classifier": ClassifierConfig}


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.local.yaml"])
def test_every_shipped_setting_validates(name: str) -> None:
    [app] = yaml.safe_load((ROOT / name).read_text())["applications"]
    AppArgs(**app.get("args", {}))
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == set(CONFIGS)
    for deployment, config in CONFIGS.items():
        config(**deployments[deployment].get("user_config", {}))


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.local.yaml"])
def test_the_ingress_logs_as_the_application_does_but_writes_the_access_lines_itself(name: str) -> None:
    """A deployment's logging_config replaces the application's whole; only Serve's access log may differ."""
    config = yaml.safe_load((ROOT / name).read_text())
    [ingress] = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    assert ingress["logging_config"] == {**config["logging_config"], "enable_access_log": False}


def test_a_misspelt_setting_is_refused_by_name() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_batch_sise"):
        ClassifierConfig(max_batch_sise=64)
    with pytest.raises(pydantic.ValidationError, match="skip_forward"):
        ClassifierConfig(skip_forward=True)  # the benchmarks' devices are not settings (load/devices.py)


def test_an_upload_admitted_to_wait_must_be_able_to_finish_within_the_request_timeout() -> None:
    IngressConfig(max_queue_wait_s=20, door_wait_s=2, request_timeout_s=30)
    with pytest.raises(pydantic.ValidationError, match="shorter than request_timeout_s"):
        IngressConfig(max_queue_wait_s=28, door_wait_s=2, request_timeout_s=30)


def test_trusted_proxies_are_networks() -> None:
    assert IngressConfig(trusted_proxies=("10.0.0.0/8", "192.168.1.7")).trusted_proxies == ("10.0.0.0/8",
                                                                                              "192.168.1.7")
    with pytest.raises(pydantic.ValidationError, match="10.0.0.300"):
        IngressConfig(trusted_proxies=("10.0.0.300/8",))


@pytest.mark.parametrize(("config", "setting"), [
    (ClassifierConfig, {"waterbird_threshold": 1.5}), (ClassifierConfig, {"max_batch_size": 0}),
    (ClassifierConfig, {"backend": "tensorflow"}), (IngressConfig, {"max_body_mb": 0}),
    (IngressConfig, {"default_top_k": 0}), (PreprocessorConfig, {"max_pixels": 0}),
])
def test_values_out_of_range_are_refused(config: type[pydantic.BaseModel], setting: dict) -> None:
    with pytest.raises(pydantic.ValidationError, match=next(iter(setting))):
        config(**setting)


def test_settings_are_frozen() -> None:
    """A replica's settings change only by `reconfigure` replacing them whole."""
    config = IngressConfig()
    with pytest.raises(pydantic.ValidationError):
        config.max_body_mb = 1  # type: ignore[misc]


def test_models_beside_the_default_and_candidates_are_named_and_checked() -> None:
    config = ClassifierConfig(name="lite0", models={"vgg-172": {"checkpoint": "/models/model_172.pth",
                                                                "classes_file": "/models/classes_172.txt"}})
    assert config.model().checkpoint == "default" and config.models["vgg-172"].classes_file.endswith(".txt")
    with pytest.raises(pydantic.ValidationError, match="model name 'a b'"):
        ClassifierConfig(models={"a b": {}})
    with pytest.raises(pydantic.ValidationError, match="threads"):
        ClassifierConfig(models={"vgg": {"threads": 2}})  # the replica's, shared by every model
    assert IngressConfig(candidates={"lite0": {"model": "vgg-172", "share": 0.2}}).candidates["lite0"].share == 0.2
    with pytest.raises(pydantic.ValidationError, match="share"):
        IngressConfig(candidates={"lite0": {"model": "vgg-172", "share": 1.5}})
