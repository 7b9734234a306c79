"""prepare_data.py's download path run for real: yt-dlp (the real package, as a subprocess) fetches from a local
web server on 127.0.0.1 that stands in for YouTube, serving real mp4 / webm files made here with ffmpeg. It
checks that each clip is cut to its window, that the workers run in parallel, that a run killed midway resumes
without fetching a finished clip again, that failures are logged and never fatal, that the oracles run and the
manifest is written, and that a run that got too little exits non-zero with one line saying why."""
import collections
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import prepare_data as pd
import rawdata

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_tools():
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not on PATH (apt-get install ffmpeg): yt-dlp cuts sections with it")
    try:
        import yt_dlp  # noqa: F401
    except ImportError:
        pytest.fail("yt-dlp is not installed (pip install -r requirements-test.txt): this test runs the real downloader")


class LocalWeb:
    """A web server on 127.0.0.1 only, serving {video id: media file} at /watch/<id> (with byte ranges, as
    ffmpeg asks for), 404 for anything else. It counts the requests for each id and how many are in flight
    at once. `hold` ids wait until release() (a kill can then land mid-download); the first request of each
    of the first `rendezvous` ids waits for the others, so parallel workers must overlap to get through.
    Bounded: it stops itself after `max_requests` requests or `idle_s` seconds without one, and on close()."""

    def __init__(self, media, hold=(), rendezvous=0, max_requests=400, idle_s=300):
        self.media, self.hold = dict(media), set(hold)
        self.hits, self.active, self.max_active, self.served = collections.Counter(), 0, 0, 0
        self.lock, self.released, self.stopped = threading.Lock(), threading.Event(), threading.Event()
        self.barrier = threading.Barrier(rendezvous, timeout=120) if rendezvous else None
        self.barrier_ids, self.barrier_broken = set(), False
        self.max_requests, self.idle_s, self.last = max_requests, idle_s, time.monotonic()
        web = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                web.serve(self, body=False)

            def do_GET(self):
                web.serve(self, body=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url_template = f"http://127.0.0.1:{self.port}/watch/{{youtube_id}}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self):
        while not self.stopped.wait(1.0):
            if time.monotonic() - self.last > self.idle_s or self.served >= self.max_requests:
                self.close()

    def serve(self, h, body):
        vid = h.path.rstrip("/").rsplit("/", 1)[-1]
        with self.lock:
            self.last = time.monotonic()
            self.served += 1
            self.hits[vid] += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            wait_barrier = self.barrier is not None and vid in self.media and vid not in self.barrier_ids \
                and len(self.barrier_ids) < self.barrier.parties
            if wait_barrier:
                self.barrier_ids.add(vid)
        try:
            if wait_barrier:
                try:
                    self.barrier.wait()
                except threading.BrokenBarrierError:
                    self.barrier_broken = True
            if vid in self.hold and not self.released.wait(120):
                h.send_error(503)
                return
            if vid not in self.media or not h.path.startswith("/watch/"):
                h.send_error(404)
                return
            data = open(self.media[vid], "rb").read()
            start, end = 0, len(data) - 1
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
            if m:
                start, end = int(m.group(1)), min(end, int(m.group(2) or end))
                h.send_response(206)
                h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                h.send_response(200)
            h.send_header("Content-Type", "video/webm" if self.media[vid].endswith(".webm") else "video/mp4")
            h.send_header("Accept-Ranges", "bytes")
            h.send_header("Content-Length", str(end - start + 1))
            h.end_headers()
            if body:
                h.wfile.write(data[start:end + 1])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a killed run)
        finally:
            with self.lock:
                self.active -= 1

    def release(self):
        self.released.set()

    def close(self):
        httpd, self.httpd = self.httpd, None
        self.stopped.set()
        self.released.set()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


SECONDS = 30


def freq_at(t):
    """The served media's tone: 300 Hz + 100 Hz per whole second, so any second of a cut tells where it came from."""
    return 300 + 100 * np.floor(t)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two 30 s sources standing in for YouTube videos: h264 + aac in mp4, vp8 + opus in webm, both with a
    moving test picture and the time-coded tone."""
    require_tools()
    d = tmp_path_factory.mktemp("web")
    tone = f"aevalsrc=0.5*sin(2*PI*(300+100*floor(t))*t):s=48000:d={SECONDS}"
    out = {}
    for name, codecs in (("src.mp4", ["-c:v", "libx264", "-c:a", "aac", "-movflags", "+faststart"]),
                         ("src.webm", ["-c:v", "libvpx", "-b:v", "200k", "-c:a", "libopus"])):
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc=size=160x120:rate=5:duration={SECONDS}", "-f", "lavfi", "-i", tone, "-shortest",
                        "-pix_fmt", "yuv420p", *codecs, str(d / name)], check=True)
        out[name] = str(d / name)
    return out


# the clip list: four real videos (two mp4, two webm) and one the server does not have (404)
CLIPS = [("AAAAAAAAAA1", 12.0, "horse", "src.mp4"), ("BBBBBBBBBB2", 5.0, "sheep", "src.webm"),
         ("CCCCCCCCCC3", 3.0, "horse", "src.mp4"), ("DDDDDDDDDD4", 0.0, "sheep", None),
         ("EEEEEEEEEE5", 17.0, "sheep", "src.webm")]


def write_list(path, clips):
    with open(path, "w") as f:
        f.write("youtube_id,start_s,class,source\n")
        for vid, start, cls, _ in clips:
            f.write(f"{vid},{start},{cls},audioset\n")
    return str(path)


def check_window(path, start, seconds=10.0):
    """The clip is `seconds` long and holds the source's [start, start + seconds]: each whole second's tone."""
    audio = pd.decode_audio(path)
    assert abs(len(audio) / 24000 - seconds) < 0.15, (path, len(audio) / 24000)
    for k in range(1, int(seconds) - 1):
        seg = audio[int((k + 0.15) * 24000):int((k + 0.85) * 24000)]
        peak = np.argmax(np.abs(np.fft.rfft(seg))) * 24000 / len(seg)
        assert abs(peak - freq_at(start + k + 0.5)) < 15, (path, k, peak)


def untrained_oracles():
    """Cnn14 and ViT-B-32 with random weights (their real weights are a download); Silero ships its own."""
    import open_clip
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    return {"pann": pd.build_cnn14().eval(), "vad": pd.load_vad(),
            "clip": (clip, open_clip.image_transform(clip.visual.image_size, is_train=False),
                     open_clip.get_tokenizer("ViT-B-32"))}


@pytest.fixture
def panns_home(tmp_path, monkeypatch):
    """panns_inference reads AudioSet's label list from ~/panns_data at import: a stand-in of the real 527-row
    shape in a private HOME, so nothing touches the network or the user's home."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = tmp_path / "home" / "panns_data"
    d.mkdir(parents=True)
    lines = ["index,mid,display_name"] + [f"{i},/m/x{i},label {i}" for i in range(527)]
    (d / "class_labels_indices.csv").write_text("\n".join(lines) + "\n")


def test_download_for_real_cut_parallel_killed_and_resumed(media, tmp_path, panns_home):
    web = LocalWeb({vid: media[src] for vid, _, _, src in CLIPS if src}, hold={"CCCCCCCCCC3"}, rendezvous=2)
    try:
        lst = write_list(tmp_path / "clips.csv", CLIPS)
        data = tmp_path / "data"
        common = ["--source=manifest", f"--path={lst}", f"--data_root={data}", "--dataset=web", "--pseudo_labels=flat",
                  f"--url_template={web.url_template}", "--download_workers=2"]
        video = data / "web" / "download" / "video"
        done = {vid: video / f"{vid}_{start:g}.mp4" for vid, start, _, _ in CLIPS}
        log = data / "web" / "download" / "failures.jsonl"

        # run 1, as a user runs it; killed (the whole process group, yt-dlp and ffmpeg too) while CCCCCCCCCC3
        # is mid-download, once the other clips are finished and the 404 is logged
        err = open(tmp_path / "run1.err", "w")
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "prepare_data.py"), *common,
                                 "--skip_oracles=pann,clip,vad"], cwd=str(tmp_path), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
        others = [done[v] for v in ("AAAAAAAAAA1", "BBBBBBBBBB2", "EEEEEEEEEE5")]
        while proc.poll() is None and not (all(p.exists() for p in others) and log.exists()
                                           and web.hits["CCCCCCCCCC3"] > 0):
            time.sleep(0.2)
        assert proc.poll() is None, f"run 1 ended before it could be killed:\n{open(err.name).read()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        err.close()
        web.release()
        assert not done["CCCCCCCCCC3"].exists()
        assert not (data / "web" / "raw" / "manifest.jsonl").exists()
        # the two workers were in flight at once (each waited at the rendezvous for the other)
        assert web.max_active >= 2 and not web.barrier_broken
        # the missing video: logged with yt-dlp's own message, not fatal
        entry = [json.loads(line) for line in open(log)][0]
        assert entry["youtube_id"] == "DDDDDDDDDD4" and "HTTP Error 404" in entry["error"]
        hits_before = dict(web.hits)

        # run 2, restarted with the oracles on (untrained PANNs / CLIP, the real Silero VAD): only what is left
        rows, table = pd.main(common + ["--pann_threshold=0", "--clip_threshold=-1"], oracle_models=untrained_oracles())
        for vid in ("AAAAAAAAAA1", "BBBBBBBBBB2", "EEEEEEEEEE5"):
            assert web.hits[vid] == hits_before[vid], f"{vid} was fetched again"
        assert web.hits["CCCCCCCCCC3"] > hits_before["CCCCCCCCCC3"] and done["CCCCCCCCCC3"].exists()
        assert not [f for f in os.listdir(video) if f.startswith(".")]   # the killed run's partial file is gone
        raw = rawdata.raw_dir("web", str(data))
        back = rawdata.read_manifest(os.path.join(raw, "manifest.jsonl"))
        assert sorted(r["video_id"] for r in back) == ["AAAAAAAAAA1", "BBBBBBBBBB2", "CCCCCCCCCC3", "EEEEEEEEEE5"]
        assert table["removed"]["download_failed"] == 1
        for r in back:
            start = r["origin"]["start_s"]
            check_window(str(done[r["video_id"]]), start)                    # the download: cut to the window
            check_window(os.path.join(raw, r["audio"]), start)               # the clip's 24 kHz audio
            frames = [rawdata.read_png(os.path.join(raw, p)) for p in r["frames"]]
            assert len({f.tobytes() for f in frames}) > 5                    # testsrc moves: 10 real keyframes
            assert 0.0 <= r["oracles"]["pann"] <= 3.0 and -1.0 <= r["oracles"]["clip"] <= 1.0
            assert r["oracles"]["vad"] == 0.0                                # a tone is not speech
        removed = [json.loads(line) for line in open(os.path.join(raw, "removed.jsonl"))]
        assert [(r["clip_id"], r["stage"]) for r in removed] == [("DDDDDDDDDD4_0", "download")]
        assert "HTTP Error 404" in removed[0]["reason"]

        # run 3 asks that 90% get through: 4 of 5 did, so it stops, saying why in one line (nothing fetched again)
        hits_before = dict(web.hits)
        with pytest.raises(pd.TooFewClips) as e:
            pd.main(common + ["--min_success=0.9"])
        assert str(e.value).startswith("1 of 5 got HTTP error 404 (e.g. DDDDDDDDDD4_0); 4 of 5 clips got through")
        # run 4: a CLIP threshold at the median of the scores just computed (cached: no model is needed) removes
        # the clips below it, each listed with its score and the threshold
        scores = sorted(r["oracles"]["clip"] for r in back)
        th = (scores[1] + scores[2]) / 2
        rows, table = pd.main(common + ["--pann_threshold=0", f"--clip_threshold={th}"])
        assert len(rows) == 2 and table["removed"]["oracle_clip"] == 2
        removed = [json.loads(line) for line in open(os.path.join(raw, "removed.jsonl"))]
        low = sorted((r for r in removed if r["stage"] == "clip"), key=lambda r: r["score"])
        assert [r["score"] for r in low] == scores[:2] and all(r["threshold"] == th for r in low)
        for vid in ("AAAAAAAAAA1", "BBBBBBBBBB2", "CCCCCCCCCC3", "EEEEEEEEEE5"):
            assert web.hits[vid] == hits_before[vid]
    finally:
        web.close()


def test_a_run_that_got_nothing_exits_nonzero_with_one_line(media, tmp_path):
    """Offline: every download is refused (a closed port on 127.0.0.1). prepare_data.py exits 1, its last line
    gives the count and the commonest reason, and removed.jsonl lists each failure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    lst = write_list(tmp_path / "offline.csv", CLIPS[:3])
    proc = subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "--source=manifest", f"--path={lst}",
                           f"--data_root={tmp_path / 'data'}", "--pseudo_labels=flat", "--download_workers=3",
                           f"--url_template=http://127.0.0.1:{port}/watch/{{youtube_id}}"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prepare_data.py: 3 of 3 were refused a connection (e.g. ")
    assert "0 of 3 clips got through" in last and "removed.jsonl" in last
    raw = rawdata.raw_dir("offline", str(tmp_path / "data"))
    assert not os.path.exists(os.path.join(raw, "manifest.jsonl"))
    removed = [json.loads(line) for line in open(os.path.join(raw, "removed.jsonl"))]
    assert sorted(r["clip_id"] for r in removed) == ["AAAAAAAAAA1_12", "BBBBBBBBBB2_5", "CCCCCCCCCC3_3"]
    assert all(r["stage"] == "download" and "Connection refused" in r["reason"] for r in removed)


def test_no_network_is_named_and_the_share_is_a_setting(tmp_path):
    """The message a machine without DNS gets from yt-dlp, and a share below --min_success (a local fetch that
    writes a real mp4 for one clip of four)."""
    def offline(youtube_id, start_s, end_s, out_path):
        raise RuntimeError(f"ERROR: [youtube] {youtube_id}: Unable to download API page: <urlopen error "
                           f"[Errno -3] Temporary failure in name resolution> (caused by TransportError())")
    lst = write_list(tmp_path / "l.csv", CLIPS)
    with pytest.raises(pd.TooFewClips) as e:
        pd.main(["--source=manifest", f"--path={lst}", f"--data_root={tmp_path}", "--pseudo_labels=flat"], fetch=offline)
    assert str(e.value).startswith("no network: 5 of 5 failed to resolve the host")

    def one_of_four(youtube_id, start_s, end_s, out_path):
        if youtube_id != "AAAAAAAAAA1":
            raise RuntimeError(f"ERROR: [youtube] {youtube_id}: Video unavailable")
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=5:duration=4",
                        "-f", "lavfi", "-i", "sine=frequency=500:duration=4", "-shortest", "-pix_fmt", "yuv420p",
                        "-f", "mp4", out_path], check=True)
    base = ["--source=manifest", f"--path={write_list(tmp_path / 'm.csv', CLIPS[:4])}", f"--data_root={tmp_path}",
            "--pseudo_labels=flat", "--skip_oracles=pann,clip,vad", "--retry_failed=True"]
    with pytest.raises(pd.TooFewClips, match=r"^3 of 4 are unavailable videos .* 1 of 4 clips got through"):
        pd.main(base, fetch=one_of_four)
    rows, table = pd.main(base + ["--min_success=0.25"], fetch=one_of_four)
    assert len(rows) == 1 and table["removed"]["download_failed"] == 3
