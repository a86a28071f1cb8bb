#!/usr/bin/env python3
"""Drives the playground (`GET /` of gpt2-server) in a real headless Chromium with Playwright.

    playground_check.py URL [--api-key KEY] [--chromium PATH]

URL is a running server's base URL (http://127.0.0.1:8080); the demo model is enough. With
--api-key the server must have been started with that key: the script first checks that a run
without it shows the 401, then types it into the page. Playwright uses the Chromium at --chromium
(default: $GPT2_TEST_CHROMIUM, else /usr/bin/chromium); it never downloads a browser.

It types a prompt, runs greedy (Ctrl+Enter), beam, and sample-top-p with 3 sequences, checks
that the text streams into the columns and that the end state is the server's own answer, shows a
422, checks the curl command against the form and runs it (200), copies it, then starts a long
generation, clicks Stop, and checks that the columns stop growing and the server's queue depth
(`gpt2_queue_depth` of GET /metrics) returns to 0. Any content-security-policy violation or script
error fails the run.

With GPT2_PLAYGROUND_SCREENSHOT=path.png it saves a screenshot of the whole page (1200 pixels wide)
after the 3-sequence run.
Prints one JSON summary line on success; exits non-zero with a message on any failure.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

PROMPT = "The playground streams"

# Which optional fields each mode shows (docs/api.md, "parameters it reads"; seed for sampling).
MODE_FIELDS = {
    "sample-top-p": {"top_p", "top_k", "seed"},
    "sample-top-k": {"top_k", "seed"},
    "sample": {"temperature", "top_k", "top_p", "seed"},
    "beam": {"num_beams", "no_repeat_ngram_size"},
    "greedy": set(),
}
OPTIONAL_FIELDS = {"top_p", "top_k", "temperature", "num_beams", "no_repeat_ngram_size", "seed"}

# Records, on every change of the columns, the time, the generated characters of each column and
# how many columns have ended: the proof that text arrives in steps, not all at once.
RECORDER = """
() => {
  window.__observations = [];
  const columns = document.getElementById("columns");
  const record = () => {
    const cols = Array.from(columns.querySelectorAll(".sequence"));
    window.__observations.push({
      t: performance.now(),
      lengths: cols.map((c) => c.querySelector(".generated").textContent.length),
      done: cols.filter((c) => c.dataset.state === "done").length,
    });
  };
  if (window.__observer) window.__observer.disconnect();
  window.__observer = new MutationObserver(record);
  window.__observer.observe(columns, { childList: true, subtree: true, characterData: true, attributes: true });
}
"""

COLUMNS = """
() => Array.from(document.querySelectorAll("#columns .sequence")).map((c) => ({
  state: c.dataset.state,
  finish: c.dataset.finish || null,
  heading: c.querySelector("h3").textContent,
  prompt: c.querySelector(".prompt").textContent,
  generated: c.querySelector(".generated").textContent,
}))
"""


def fail(message):
    sys.exit(f"playground_check: {message}")


def check(condition, message):
    if not condition:
        fail(message)


def queue_depth(base_url, api_key):
    request = urllib.request.Request(base_url + "/metrics")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^gpt2_queue_depth (\S+)$", text, re.MULTILINE)
    check(match, f"/metrics has no gpt2_queue_depth:\n{text[:2000]}")
    return float(match.group(1))


def invoke(base_url, api_key, body):
    """The server's JSON answer to `body` (without streaming)."""
    request = urllib.request.Request(
        base_url + "/invocations",
        data=json.dumps(dict(body, stream=False)).encode(),
        headers={"Content-Type": "application/json"},
    )
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def curl_body(command):
    """The JSON body of the page's curl command (its --data argument)."""
    words = shlex.split(command.replace("\\\n", " "))
    check("--data" in words, f"no --data in the curl command: {command}")
    return json.loads(words[words.index("--data") + 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("--api-key", default="")
    parser.add_argument(
        "--chromium", default=os.environ.get("GPT2_TEST_CHROMIUM") or "/usr/bin/chromium"
    )
    args = parser.parse_args()
    base_url = args.url.rstrip("/")
    screenshot = os.environ.get("GPT2_PLAYGROUND_SCREENSHOT")
    summary = {}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=args.chromium, headless=True, args=["--no-sandbox"]
        )
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        page = context.new_page()
        page.set_default_timeout(60_000)
        problems = []
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

        def on_console(message):
            text = message.text
            # Chromium logs every non-2xx fetch ("Failed to load resource: ... 401"); the 401 and
            # the 422 below are deliberate.
            if message.type == "error" and "Failed to load resource" not in text:
                problems.append(f"console error: {text}")

        page.on("console", on_console)
        page.add_init_script(
            "document.addEventListener('securitypolicyviolation', (e) => "
            "{ (window.__csp = window.__csp || []).push(e.violatedDirective + ' ' + e.blockedURI); });"
        )

        # The page: served without credentials, with its headers.
        response = page.goto(base_url + "/")
        check(response is not None and response.status == 200, f"GET / answered {response}")
        headers = response.headers
        check(headers.get("content-type") == "text/html; charset=utf-8", f"headers {headers}")
        check("default-src 'self'" in headers.get("content-security-policy", ""), f"{headers}")
        check(headers.get("cache-control") == "no-cache", f"headers {headers}")
        check(page.title() == "gpt2-server playground", f"title {page.title()!r}")
        summary["page"] = "loaded"

        # The contract's defaults.
        defaults = {
            "mode": "sample-top-p", "max_length": "100", "num_return_sequences": "3",
            "top_p": "0.92", "top_k": "50", "temperature": "0.7", "num_beams": "5",
            "no_repeat_ngram_size": "2", "seed": "",
        }
        for field, value in defaults.items():
            actual = page.input_value(f"#{field}")
            check(actual == value, f"{field} defaults to {actual!r}, not {value!r}")

        # Each mode shows the parameters it reads, and only those.
        for mode, fields in MODE_FIELDS.items():
            page.select_option("#mode", mode)
            shown = {f for f in OPTIONAL_FIELDS if page.is_visible(f"#{f}")}
            check(shown == fields, f"{mode} shows {sorted(shown)}, not {sorted(fields)}")
            sent = curl_body(page.text_content("#curl"))
            check(sent["mode"] == mode and (set(sent) & OPTIONAL_FIELDS) == fields - {"seed"},
                  f"{mode}: the curl command sends {sent}")
        summary["modes"] = "each shows its parameters"

        page.fill("#input", PROMPT)
        if args.api_key:
            # Without the key the page shows the server's 401.
            page.select_option("#mode", "greedy")
            page.click("#run")
            page.wait_for_selector("#error:not([hidden])")
            error = page.text_content("#error")
            check("401" in error and "unauthorized" in error, f"the error box says {error!r}")
            page.fill("#api_key", args.api_key)
            check(f"Authorization: Bearer {args.api_key}" in page.text_content("#curl"),
                  "the curl command lacks the key")
            summary["auth"] = "401 shown without the key"

        # Greedy, started from the keyboard: 3 identical sequences.
        page.select_option("#mode", "greedy")
        page.fill("#max_length", "40")
        page.focus("#input")
        page.keyboard.press("Control+Enter")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')")
        check(page.is_hidden("#error"), f"greedy failed: {page.text_content('#error')}")
        greedy = page.evaluate(COLUMNS)
        check(len(greedy) == 3, f"greedy columns: {greedy}")
        check(all(c["state"] == "done" and c["finish"] in ("length", "eos") for c in greedy), f"{greedy}")
        check(len({c["generated"] for c in greedy}) == 1 and greedy[0]["generated"], f"{greedy}")
        expected = invoke(base_url, args.api_key, curl_body(page.text_content("#curl")))
        check([c["prompt"] + c["generated"] for c in greedy] == expected,
              f"greedy columns {greedy} are not the server's answer {expected}")
        summary["greedy"] = "3 identical sequences, the server's answer"

        # Beam: no token events, each sequence arrives whole when the search ends.
        page.select_option("#mode", "beam")
        page.fill("#num_beams", "3")
        page.fill("#num_return_sequences", "2")
        page.fill("#max_length", "24")
        page.click("#run")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')")
        check(page.is_hidden("#error"), f"beam failed: {page.text_content('#error')}")
        beam = page.evaluate(COLUMNS)
        expected = invoke(base_url, args.api_key, curl_body(page.text_content("#curl")))
        check(len(beam) == 2 and all(c["state"] == "done" for c in beam), f"beam columns: {beam}")
        check([c["prompt"] + c["generated"] for c in beam] == expected,
              f"beam columns {beam} are not the server's answer {expected}")
        summary["beam"] = "2 sequences, the server's answer"

        # sample-top-p, 3 sequences, seeded: the text streams in, and ends as the JSON answer.
        page.select_option("#mode", "sample-top-p")
        page.fill("#num_return_sequences", "3")
        page.fill("#max_length", "160")
        page.fill("#seed", "7")
        form = {"input": PROMPT, "mode": "sample-top-p", "max_length": 160,
                "num_return_sequences": 3, "top_p": 0.92, "top_k": 50, "seed": 7, "stream": True}
        command = page.text_content("#curl")
        check(curl_body(command) == form, f"the curl command {command!r} is not the form {form}")
        check(command.rstrip().endswith(f"'{base_url}/invocations'"), f"curl URL: {command}")
        page.evaluate(RECORDER)
        page.click("#run")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')")
        check(page.is_hidden("#error"), f"sample-top-p failed: {page.text_content('#error')}")
        observations = page.evaluate("window.__observations")
        growing = [o for o in observations if o["done"] == 0 and sum(o["lengths"]) > 0]
        totals = sorted({sum(o["lengths"]) for o in growing})
        check(len(totals) >= 2, f"the text did not grow in steps before the end: {observations[:20]}")
        spread = [o["lengths"] for o in growing if min(o["lengths"]) > 0]
        check(spread, "the three columns never showed text at the same time before the end")
        sampled = page.evaluate(COLUMNS)
        check(len(sampled) == 3 and all(c["state"] == "done" for c in sampled), f"{sampled}")
        check(all(c["heading"].endswith(f"({c['finish']})") for c in sampled), f"{sampled}")
        expected = invoke(base_url, args.api_key, form)
        check([c["prompt"] + c["generated"] for c in sampled] == expected,
              f"the columns {sampled} are not the server's answer {expected}")
        check(page.text_content("#status").startswith("Done"), page.text_content("#status"))
        check(page.is_enabled("#run") and page.is_disabled("#stop"), "buttons after the run")
        summary["stream"] = {"observations": len(observations), "distinct_totals": len(totals)}
        if screenshot:
            page.evaluate(
                "() => { for (const t of document.querySelectorAll('#columns .text')) t.scrollTop = 0; }"
            )
            page.screenshot(path=screenshot, full_page=True)
            summary["screenshot"] = screenshot

        # The curl command, run: 200 and the same sequences.
        run = subprocess.run(
            ["bash", "-c", command + " -sS -w '\\nHTTP %{http_code}\\n'"],
            capture_output=True, text=True, timeout=120,
        )
        check(run.returncode == 0, f"curl failed: {run.stderr}")
        check(run.stdout.rstrip().endswith("HTTP 200"), f"curl: {run.stdout[-500:]}")
        check("data: [DONE]" in run.stdout, f"curl did not stream: {run.stdout[-500:]}")
        ends = [json.loads(line[6:]) for line in run.stdout.splitlines()
                if line.startswith("data: {") and "generated_text" in line]
        texts = [e["generated_text"] for e in sorted(ends, key=lambda e: e["index"])]
        check(texts == expected, f"curl's sequences {texts} are not the page's {expected}")
        summary["curl"] = "200, the same sequences"

        # Copy: to the clipboard, or selected for Ctrl+C where there is none.
        page.click("#copy")
        page.wait_for_function("() => document.getElementById('copy-status').textContent !== ''")
        note = page.text_content("#copy-status")
        if note == "Copied.":
            copied = page.evaluate("navigator.clipboard.readText()")
            check(copied == command, f"the clipboard holds {copied!r}")
        else:
            selected = page.evaluate("window.getSelection().toString()")
            check(note.startswith("Selected") and selected == command, f"{note}: {selected!r}")
        summary["copy"] = note

        # An invalid value: the server's 422 is shown, and no columns are left behind.
        page.fill("#top_p", "3")
        page.click("#run")
        page.wait_for_selector("#error:not([hidden])")
        error = page.text_content("#error")
        check(error.startswith("422 validation_error:") and "top_p" in error, f"error box {error!r}")
        check(page.evaluate(COLUMNS) == [], "columns left after a 422")
        page.fill("#top_p", "0.92")
        summary["error"] = error

        # A long generation, stopped: the columns stop growing, the server frees its place.
        page.fill("#max_length", "1000")
        page.fill("#seed", "")
        check("seed" not in curl_body(page.text_content("#curl")), "an empty seed is sent")
        check(queue_depth(base_url, args.api_key) == 0, "requests in flight before the long run")
        page.click("#run")
        page.wait_for_function(
            "() => Array.from(document.querySelectorAll('#columns .generated'))"
            ".reduce((n, c) => n + c.textContent.length, 0) > 100"
        )
        in_flight = queue_depth(base_url, args.api_key)
        check(in_flight == 1, f"gpt2_queue_depth during the long run: {in_flight}")
        check(page.is_hidden("#error"), f"the long run failed: {page.text_content('#error')}")
        page.click("#stop")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Stopped')")
        at_stop = page.evaluate(COLUMNS)
        check(all(c["state"] == "stopped" for c in at_stop), f"states after Stop: {at_stop}")
        time.sleep(1.0)
        later = page.evaluate(COLUMNS)
        check(later == at_stop, "the columns kept changing after Stop")
        generated = sum(len(c["generated"]) for c in at_stop)
        deadline = time.monotonic() + 15
        depth = queue_depth(base_url, args.api_key)
        while depth != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
            depth = queue_depth(base_url, args.api_key)
        check(depth == 0, f"gpt2_queue_depth stayed at {depth} after Stop")
        check(page.is_enabled("#run") and page.is_disabled("#stop"), "buttons after Stop")
        summary["stop"] = {"characters_at_stop": generated, "queue_depth_after": depth}

        violations = page.evaluate("window.__csp || []")
        check(not violations, f"content-security-policy violations: {violations}")
        check(not problems, "; ".join(problems))
        browser.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
