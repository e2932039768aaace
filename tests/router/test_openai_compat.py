"""``POST /v1/images/generations`` through the real ``openai`` client and raw HTTP."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from io import BytesIO

import httpx
import openai
import pytest
from PIL import Image

from controlplane.registry import Registry
from router.openai_compat import OpenAIError, parse_body, parse_size
from tests.conftest import POLICIES
from tests.service import Service


@pytest.mark.parametrize("size", ["64", "64x", "x64", "64X64", "0x64", "64x64x1", "wide", ""])
def test_a_malformed_size_names_the_param(size: str) -> None:
    with pytest.raises(OpenAIError) as raised:
        parse_size(size)
    error = raised.value.body["error"]
    assert raised.value.status_code == 400
    assert (error["param"], error["type"], error["code"]) == ("size", "invalid_request_error",
                                                              "invalid_size")
    assert repr(size) in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "response_format": "png"}, "response_format"),
    ({"prompt": "x", "quality": "hd"}, "quality"),
])
def test_bad_bodies_name_the_param(body: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as raised:
        parse_body(body)
    assert raised.value.status_code == 400
    assert raised.value.body["error"]["param"] == param
    assert raised.value.body["error"]["message"].startswith(f"{param}: ")


@pytest.fixture(scope="module")
def service(tiny_registry: Registry, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:
    svc = Service(home=tmp_path_factory.mktemp("openai"), registry=tiny_registry.root,
                  policy=POLICIES / "remote_provider.yaml")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture
def client(service: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{service.url}/v1", api_key="not-checked",
                       max_retries=0, timeout=60) as api:
        yield api


def test_the_openai_client_gets_decodable_images_of_the_size(client: openai.OpenAI) -> None:
    result = client.images.generate(model="laneway-draft", prompt="a lighthouse", n=2,
                                    size="64x48", response_format="b64_json",  # type: ignore[arg-type]
                                    user="studio-a")
    assert result.created > 0 and result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = Image.open(BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (64, 48)


def test_url_format_points_at_the_job_image(client: openai.OpenAI, service: Service) -> None:
    result = client.images.generate(model="laneway-fast", prompt="a lighthouse",
                                    size="48x64", response_format="url")  # type: ignore[arg-type]
    assert result.data is not None
    (item,) = result.data
    assert item.url is not None and item.url.startswith(service.url + "/v1/jobs/")
    png = httpx.get(item.url, timeout=30)
    assert png.status_code == 200
    assert Image.open(BytesIO(png.content)).size == (48, 64)


@pytest.mark.parametrize(("size", "message"), [
    ("64x60", "multiple of 8"), ("1024x1024", "pixels"), ("big", "WIDTHxHEIGHT")])
def test_an_invalid_size_is_a_400_in_the_openai_shape(client: openai.OpenAI, size: str,
                                                      message: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="laneway-draft", prompt="a lighthouse",
                               size=size)  # type: ignore[arg-type]
    assert raised.value.status_code == 400
    assert raised.value.param == "size"
    assert raised.value.type == "invalid_request_error"
    assert message in raised.value.message


def test_an_unknown_model_is_a_404_naming_the_known_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.images.generate(model="dall-e-3", prompt="a lighthouse")
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    assert "laneway-draft" in raised.value.message


@pytest.mark.parametrize(("content", "param"), [
    (b"{not json", None), (b'{"prompt": "x", "n": 9}', "n"), (b'{"prompt": ""}', "prompt")])
def test_raw_errors_use_the_openai_shape(service: Service, content: bytes,
                                         param: str | None) -> None:
    response = httpx.post(f"{service.url}/v1/images/generations", content=content,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
