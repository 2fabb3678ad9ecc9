"""The web playground in a real headless Chromium: type a question, see reasoning and answer stream in."""

from __future__ import annotations

import shutil

import pytest

from k25.server.app import create_app
from k25.testing import ScriptedBackend, ServerThread, byte_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")


@pytest.fixture
def page_and_backend(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright drives the browser (test extra)")
    backend = ScriptedBackend(byte_tokenizer(tmp_path))
    with ServerThread(create_app(backend)) as srv, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        page = browser.new_page()
        page.goto(srv.url + "/")
        yield page, backend, tmp_path
        browser.close()


def test_chat_in_the_browser(page_and_backend):
    page, backend, tmp_path = page_and_backend
    page.wait_for_function("document.getElementById('model').textContent.includes('k25-test')")
    backend.outputs = ["Adding two and two.</think>2 + 2 = 4.<|im_end|>"]
    page.fill("#prompt", "What is 2+2?")
    page.click("#send")
    page.wait_for_selector(".assistant .meta")
    assert page.inner_text(".assistant .content") == "2 + 2 = 4."
    assert "Adding two and two." in page.text_content(".assistant details.reasoning pre")
    assert "stop" in page.inner_text(".assistant .meta")
    assert backend.prompts[-1].endswith("What is 2+2?<|im_end|><|im_assistant|>assistant<|im_middle|><think>")
    page.screenshot(path=str(tmp_path / "playground.png"))
    # Instant mode and a second turn: the history (with its reasoning) goes back to the server
    page.select_option("#mode", "instant")
    backend.outputs = ["Eight.<|im_end|>"]
    page.fill("#prompt", "And 4+4?")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.assistant .meta').length == 2")
    assert page.locator(".assistant .content").nth(1).inner_text() == "Eight."
    assert backend.prompts[-1].endswith("<think></think>")
    assert "2 + 2 = 4." in backend.prompts[-1]


def test_errors_are_shown(page_and_backend):
    page, backend, _ = page_and_backend
    page.fill("#tools", "[not json")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_selector("span.error")
    assert "tools:" in page.inner_text("span.error")
    backend.full = True
    page.fill("#tools", "")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('span.error').length == 2")
    assert "429: the server is at capacity" in page.locator("span.error").nth(1).inner_text()


def test_swarm_mode_draws_a_timeline(page_and_backend):
    import json

    page, backend, tmp_path = page_and_backend

    def call(idx, name, args):
        return (f"<|tool_call_begin|>functions.{name}:{idx}<|tool_call_argument_begin|>{json.dumps(args)}"
                "<|tool_call_end|>")

    def section(*calls):
        return "<|tool_calls_section_begin|>" + "".join(calls) + "<|tool_calls_section_end|><|im_end|>"

    backend.outputs = [
        "Plan.</think>" + section(call(0, "create_subagent", {"name": "reader", "system_prompt": "You read."})),
        "Split.</think>" + section(call(1, "assign_task", {"agent": "reader", "prompt": "Part one"}),
                                   call(2, "assign_task", {"agent": "reader", "prompt": "Part two"})),
        "Ok.</think>Read one.<|im_end|>", "Ok.</think>Read two.<|im_end|>",
        "Merge.</think>Both parts read.<|im_end|>",
    ]
    page.select_option("#mode", "swarm")
    page.fill("#prompt", "Read both parts.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.swarm .meta') && "
                           "document.querySelector('.swarm .meta').textContent.includes('sub-agents')", timeout=60_000)
    assert page.inner_text(".swarm .content") == "Both parts read."
    assert page.locator(".swarm .lane").count() == 2
    assert "reader" in page.inner_text(".swarm .timeline")
    page.screenshot(path=str(tmp_path / "swarm.png"))


def test_image_upload(page_and_backend):
    import io

    from PIL import Image

    page, backend, tmp_path = page_and_backend
    image = tmp_path / "red.png"
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    image.write_bytes(buf.getvalue())
    page.wait_for_function("document.getElementById('model').textContent.includes('k25-test')")
    page.set_input_files("#image", str(image))
    page.wait_for_selector("#preview:not([hidden])")
    backend.outputs = ["It is red.</think>A red rectangle.<|im_end|>"]
    page.fill("#prompt", "What colour is this?")
    page.click("#send")
    page.wait_for_selector(".assistant .meta")
    assert page.inner_text(".assistant .content") == "A red rectangle."
    assert page.locator(".user img").count() == 1
    assert backend.media is not None and backend.media[1].tolist() == [[1, 4, 4]]
    assert backend.prompts[-1].count("<|media_pad|>") == 4


def test_tool_call_then_typed_tool_result(page_and_backend):
    page, backend, _ = page_and_backend
    page.wait_for_function("document.getElementById('model').textContent.includes('k25-test')")
    page.fill("#tools", '[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object",'
                        '"properties":{"city":{"type":"string"}}}}}]')
    backend.outputs = [
        "Need the weather.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
        "Got it.</think>It is 18 degrees in Paris.<|im_end|>",
    ]
    page.fill("#prompt", "Weather in Paris?")
    page.click("#send")
    page.wait_for_selector(".toolresults input")
    assert "get_weather" in page.inner_text(".assistant .toolcall")
    page.fill(".toolresults input", "18C, sunny")
    page.click(".toolresults button")
    page.wait_for_function("document.querySelectorAll('.assistant .meta').length == 2")
    assert page.locator(".assistant .content").nth(1).inner_text() == "It is 18 degrees in Paris."
    prompt = backend.prompts[-1]
    assert "## Return of functions.get_weather:0\n18C, sunny" in prompt
    assert "<think>Need the weather.</think><|tool_calls_section_begin|>" in prompt
