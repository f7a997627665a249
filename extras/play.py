"""`facesynth.py play --ckpt runs/NAME`: a page to drag a face's 68 landmarks and watch G redraw it.

The page (play.html beside this file: plain HTML, CSS and JavaScript, nothing to build or fetch) is
served by the standard library's http.server. It speaks JSON to four addresses:

    GET  /api/info     the run, the faces to start from, the sliders
    POST /api/source   {"source": "synthetic:ID" | "video:NAME:FRAME"} -> the source crop and its landmarks
    POST /api/upload   a photo's bytes -> the same, its landmarks detected (the optional dlib extra)
    POST /api/draw     {"client", "source", "sliders", "offsets", "heatmaps"} -> G's face, PNG data URLs

A draw request carries the sliders (pose and expression, as the synthetic talking heads move) and
the page's drags as offsets from the landmarks the sliders give. One worker thread does all drawing;
while it draws, each client keeps only its newest request waiting (an older one is answered
"superseded"), so a fast drag never queues up work. Only files of the run are read: the checkpoint,
its prepared dataset's test split (by name, from split.json), and the page itself.
"""
import base64
import collections
import http.server
import io
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import traceback
import urllib.parse

import numpy as np
import torch
from PIL import Image, ImageOps

from data import CROP_SCALE, N_LANDMARKS, DataError, crop_face, heatmap_picture, read_prepared, to_uint8
from evaluate import VMAX, VMIN, error_heatmap, png_bytes, videos_of
from extras import landmarks, synthetic
from extras.cli import number
from extras.reenact import retarget, to_crop
from networks import generate, load_generator, pick_device

HOST, PORT = "127.0.0.1", 8064
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "play.html")
MAX_JSON = 64 * 1024            # bytes of a JSON request: 68 offsets and seven sliders take ~3 KB
MAX_UPLOAD = 8 * 1024 * 1024    # bytes of an uploaded photo
MAX_PIXELS = 40_000_000         # an upload's pixels, checked before it is decoded (a decompression bomb)
RATE, BURST = 100, 200          # requests a second per address, sustained and in a burst (the page: <= 60)
TIMEOUT = 10                    # seconds a connection may sit idle or take to send its request
MAX_CONNECTIONS = 32            # open connections at once; more are answered 503
KEEP_UPLOADS = 8                # uploaded faces kept; older ones must be uploaded again
SYNTHETIC_IDS = range(50, 60)   # the built-in set's first test identities: G never saw them
# The sliders: (what they move, lowest, highest, the range the synthetic set was made with). Past that
# range the page shows where G stops generalising.
SLIDERS = {"open": ("expression", 0, 1, 1), "smile": ("expression", 0, 1, 1), "brow": ("expression", 0, 1, 1),
           "blink": ("expression", 0, 1, 1),
           **{k: ("pose", -1.5 * m, 1.5 * m, m) for k, m in synthetic.MAX_POSE.items()}}
NEUTRAL = ({"yaw": 0.0, "pitch": 0.0, "roll": 0.0, "tx": 0.0, "ty": 0.0, "scale": 0.19},
           {"open": 0.0, "smile": 0.0, "brow": 0.0, "blink": 0.0})


class Refused(Exception):
    """A request the server will not serve: an HTTP status and a one-line reason."""
    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code


def data_url(img):
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def reference_head():
    """Any face without a synthetic identity moves as this average head does (relative retargeting, as
    reenact does): the identity of synthetic:0 with every shape parameter at its mean."""
    head = synthetic.identity_spec("synthetic:0", "0", 1)[1]
    return {**head, "shape": {k: 0.0 for k in head["shape"]}}


def read_sliders(body):
    """The request's sliders (any subset of SLIDERS, numbers in range) -> {name: float}."""
    given = body.get("sliders", {})
    if not isinstance(given, dict) or set(given) - set(SLIDERS):
        raise Refused(400, f"sliders: expected an object with keys among {', '.join(SLIDERS)}")
    out = {}
    for k, v in given.items():
        lo, hi = SLIDERS[k][1:3]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise Refused(400, f"sliders.{k}: {json.dumps(v)[:20]} is not a number in [{lo:g}, {hi:g}]")
        out[k] = float(v)
    return out


def read_offsets(body, size):
    """The page's drags: (68,2) pixel offsets, each at most a crop wide."""
    off = body.get("offsets")
    if off is None:
        return np.zeros((N_LANDMARKS, 2), np.float32)
    try:
        off = np.array(off, np.float64)
    except (TypeError, ValueError):
        off = None
    if off is None or off.shape != (N_LANDMARKS, 2) or not np.isfinite(off).all() or np.abs(off).max() > size:
        raise Refused(400, f"offsets: expected {N_LANDMARKS} [dx, dy] pairs of numbers within ±{size} px")
    return off.astype(np.float32)


def decode_upload(body):
    """A photo's bytes -> RGB uint8, upright as viewers show it (phone photos often carry an EXIF turn)."""
    try:
        im = Image.open(io.BytesIO(body))
        if im.width * im.height > MAX_PIXELS:
            raise Refused(413, f"upload: {im.width}x{im.height} is over {MAX_PIXELS // 10 ** 6} megapixels")
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        raise Refused(400, "upload: not an image Pillow can read (PNG, JPEG, ...)") from None


# ----------------------------------------------------------------------------- drawing, one at a time
class Latest:
    """One worker thread runs draw(job). Each key (a client) has at most one job waiting; a newer one
    replaces it, and the older job's sender hears it was superseded. Keys wait in arrival order."""
    def __init__(self, draw):
        self.draw, self.cond, self.stopped = draw, threading.Condition(), False
        self.waiting = collections.OrderedDict()  # key -> its one waiting job, oldest first
        self.thread = threading.Thread(target=self._work, name="play-draw", daemon=True)
        self.thread.start()

    def submit(self, key, job):
        """The job's result; None when a newer job of the same key replaced it before it was drawn."""
        slot = {"job": job, "done": threading.Event(), "result": None, "error": None}
        with self.cond:
            if self.stopped:
                raise Refused(503, "the server is stopping")
            old = self.waiting.pop(key, None)
            if old:
                old["done"].set()  # result None: superseded
            self.waiting[key] = slot
            self.cond.notify()
        slot["done"].wait()
        if slot["error"]:
            raise slot["error"]
        return slot["result"]

    def _work(self):
        while True:
            with self.cond:
                while not self.waiting and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
                _, slot = self.waiting.popitem(last=False)
            try:
                slot["result"] = self.draw(slot["job"])
            except Exception as e:  # the handler turns it into a 4xx/5xx; the worker lives on
                slot["error"] = e
            slot["done"].set()

    def stop(self):
        with self.cond:
            self.stopped = True
            for slot in self.waiting.values():
                slot["error"] = Refused(503, "the server is stopping")
                slot["done"].set()
            self.cond.notify_all()
        self.thread.join()


class Player:
    """The run's G and the faces to play with; draw() is what the worker thread runs."""
    def __init__(self, ckpt, device=None):
        self.G, self.run = load_generator(ckpt, pick_device(device))
        a = self.run["args"]
        self.size, self.ckpt = a["size"], ckpt
        root = a.get("data") or os.path.join(synthetic.SYNTH_CACHE, "prepared")
        self.prep, self.videos, self.split = {}, {}, None
        if os.path.isfile(os.path.join(root, "split.json")):  # the run's own test videos, when they are here
            try:
                self.prep = read_prepared(root)
                if self.prep.get("size") != self.size:
                    raise DataError(f"{root} holds {self.prep.get('size')} px faces, G draws {self.size} px")
                self.split, videos = videos_of(root)
                self.videos = {v["name"]: v for v in videos}
            except DataError as e:
                self.prep = {}
                print(f"note: only synthetic faces to start from: {e}")
        self.crop_scale = self.prep.get("crop_scale", CROP_SCALE)  # crop as the training set was cropped
        self.raw_size = self.prep.get("raw_size", synthetic.SYNTH_SIZE)
        self.reference, self.lock = reference_head(), threading.Lock()
        self.sources, self.uploads, self.n_uploads, self.moved_cache = collections.OrderedDict(), {}, 0, {}
        try:
            landmarks.dlib_models()
            self.upload_hint = None
        except DataError as e:
            self.upload_hint = f"uploads: {e}"
        self.latest = Latest(self.draw)

    def info(self):
        sources = [{"spec": f"synthetic:{i}", "label": f"synthetic:{i}", "frames": 0} for i in SYNTHETIC_IDS]
        sources += [{"spec": f"video:{n}", "label": f"{self.split} video {n}", "frames": len(v["landmarks"])}
                    for n, v in self.videos.items()]
        return {"ckpt": os.path.basename(os.path.normpath(self.ckpt)), "step": self.run["step"],
                "size": self.size,
                "params_G": self.run["params_G"], "sources": sources, "upload": self.upload_hint,
                "error_scale": [VMIN, VMAX], "max_upload": MAX_UPLOAD,
                "sliders": {k: {"lo": lo, "hi": hi, "trained": m} for k, (_, lo, hi, m) in SLIDERS.items()}}

    def synthetic_source(self, spec, identity, pose, expression, image=None):
        """A source with a synthetic identity: its landmarks and crop box from a render of it."""
        img, full = synthetic.render_face(identity, pose, expression, self.raw_size)
        crop, lm = crop_face(img, full, self.size, self.crop_scale)
        return {"spec": spec, "image": crop if image is None else np.array(image), "lm": lm, "box": full,
                "identity": identity, "pose": dict(pose), "expression": dict(expression)}

    def build(self, spec):
        kind, _, rest = spec.partition(":")
        if kind == "synthetic" and rest.isdigit() and len(rest) <= 5:  # upright and neutral, to start from
            return self.synthetic_source(spec, synthetic.identity_spec(spec, rest, 1)[1], *NEUTRAL)
        if kind == "video":
            name, _, t = rest.rpartition(":")
            v = self.videos.get(name)
            if v is None or not t.isdigit() or int(t) >= len(v["landmarks"]):
                raise Refused(404, f"source {spec[:60]}: no such frame; expected video:NAME:FRAME, NAME a "
                                   f"video of the run's {self.split or 'test'} split (/api/info lists them)")
            image, t = v["frames"][int(t)], int(t)
            if v["params"]:  # a synthetic video: its frame's identity, pose and expression give the truth
                frame = v["params"]["frames"][t]
                identity = v["params"]["identity"]
                return self.synthetic_source(spec, identity, frame["pose"], frame["expression"], image)
            return {"spec": spec, "image": np.array(image), "lm": v["landmarks"][t], "identity": None,
                    "pose": NEUTRAL[0], "expression": NEUTRAL[1]}
        raise Refused(400, f"source {spec[:60]!r}: expected synthetic:ID, video:NAME:FRAME or upload:N")

    def source(self, spec):
        """A face by its spec; built ones are kept, so a drag's requests find theirs at once."""
        if not isinstance(spec, str) or len(spec) > 100:
            raise Refused(400, "source: expected a string such as synthetic:50")
        with self.lock:
            if spec.startswith("upload:"):
                if spec not in self.uploads:
                    raise Refused(404, f"source {spec[:60]}: no such upload (the last {KEEP_UPLOADS} are "
                                       "kept); "
                                       "upload the photo again")
                return self.uploads[spec]
            if spec not in self.sources:
                self.sources[spec] = self.build(spec)
                while len(self.sources) > 16:
                    self.sources.popitem(last=False)
            self.sources.move_to_end(spec)
            return self.sources[spec]

    def described(self, src):
        """What the page needs of a new source: its crop, landmarks and where the sliders start."""
        given = {**src["pose"], **src["expression"]}
        start = {k: float(np.clip(given[k], lo, hi)) for k, (_, lo, hi, _) in SLIDERS.items()}
        return {"source": src["spec"], "image": data_url(src["image"]), "lm": np.round(src["lm"], 3).tolist(),
                "sliders": start, "synthetic": src["identity"] is not None}

    def upload(self, body):
        """An uploaded photo -> a source, its landmarks detected and cut by THE crop."""
        image = decode_upload(body)
        try:
            find = landmarks.landmark_detector()
        except DataError as e:
            raise Refused(501, f"uploads: {e}") from None
        with self.lock:  # one detection at a time: dlib's models are shared
            lm = find(image)
            if lm is None:
                raise Refused(422, "upload: no face found in the photo (it needs a frontal face ~80 px wide)")
            crop, uv = crop_face(image, lm, self.size, self.crop_scale)
            spec, self.n_uploads = f"upload:{self.n_uploads}", self.n_uploads + 1
            self.uploads[spec] = {"spec": spec, "image": crop, "lm": uv, "identity": None,
                                  "pose": NEUTRAL[0], "expression": NEUTRAL[1]}
            self.uploads.pop(f"upload:{self.n_uploads - 1 - KEEP_UPLOADS}", None)
        return self.described(self.uploads[spec])

    def moved(self, src, sliders):
        """The landmarks the sliders give (the source crop's pixels) and, for a synthetic identity, the
        true face: rendered doing it and cut by the source's crop box, so a head turn shows as one.
        Any other face moves as the reference head moves from neutral (relative retargeting)."""
        key = (src["spec"], tuple(sorted(sliders.items())))
        if key not in self.moved_cache:
            pose, expression = ({**src[part], **{k: v for k, v in sliders.items() if SLIDERS[k][0] == part}}
                                for part in ("pose", "expression"))
            if src["identity"]:
                img, full = synthetic.render_face(src["identity"], pose, expression, self.raw_size)
                value = (to_crop(full, src["box"], self.size, self.crop_scale),
                         crop_face(img, src["box"], self.size, self.crop_scale)[0])
            else:
                ref = [synthetic.render_face(self.reference, p, e, 64)[1]
                       for p, e in (NEUTRAL, (pose, expression))]
                value = retarget(src["lm"], np.stack(ref))[1], None
            self.moved_cache = {key: value}  # one entry: a drag's requests reuse the sliders' landmarks
        return self.moved_cache[key]

    def draw(self, job):
        """G's face for one request, with what the page shows beside it. Runs on the worker thread only."""
        t0 = time.perf_counter()
        src, offsets, a = job["src"], job["offsets"], self.run["args"]
        lm, truth = self.moved(src, job["sliders"])
        cond = lm + offsets
        t1 = time.perf_counter()
        gen = generate(self.G, self.run, src["image"][None], cond[None], src["lm"][None])[0]
        t2 = time.perf_counter()
        out = {"lm": np.round(lm, 3).tolist(), "image": data_url(gen)}
        if job["heatmaps"]:
            out["heatmaps"] = data_url(to_uint8(heatmap_picture(torch.as_tensor(cond[None]), self.size,
                                                                a["sigma"], a["window"]))[0])
        if truth is not None:
            out["truth"] = data_url(truth)
            if not offsets.any():  # a dragged face has no ground truth
                out["error"] = data_url(error_heatmap(gen, truth))
                out["l1"] = float(np.abs(gen.astype(np.float64) - truth).mean())
        out["ms"] = {"G": round(1000 * (t2 - t1), 1), "draw": round(1000 * (time.perf_counter() - t0), 1)}
        return out

    def request_draw(self, body, client):
        c = body.get("client", client)
        if not isinstance(c, str) or len(c) > 64:
            raise Refused(400, "client: expected a string of at most 64 characters")
        job = {"src": self.source(body.get("source")), "sliders": read_sliders(body),
               "offsets": read_offsets(body, self.size), "heatmaps": bool(body.get("heatmaps"))}
        return self.latest.submit(c, job) or {"superseded": True}


# ----------------------------------------------------------------------------- the server
class Handler(http.server.BaseHTTPRequestHandler):
    """Every request ends in one reply: 200 with JSON or the page, or a 4xx/5xx whose JSON says why in
    one line. Only the page and /api/ addresses exist; no request names a file."""
    server_version = "facesynth-play"
    protocol_version = "HTTP/1.1"  # keep-alive: a drag's requests share one connection
    disable_nagle_algorithm = True  # else the body, sent after the headers, waits ~40 ms for their ACK
    timeout = TIMEOUT

    def log_message(self, fmt, *args):
        pass  # a drag sends ~10 requests a second; failures are logged by reply()

    def reply(self, code, body, ctype="application/json"):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        if code >= 400:
            self.close_connection = True  # the rest of a refused request is never read
            print(f"play: {self.command} {self.path[:60]} -> {code} {json.loads(body)['error']}",
                  file=sys.stderr)
        try:
            self.send_response(code)
            for k, v in (("Content-Type", ctype), ("Content-Length", str(len(body))),
                         ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")):
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client is gone: nobody to tell
            self.close_connection = True

    def answer(self, route):
        try:
            if not self.server.allow(self.client_address[0]):
                raise Refused(429, f"over {RATE} requests a second; the page never sends that many")
            out = route(urllib.parse.urlsplit(self.path).path)
            self.reply(200, *(out if isinstance(out, tuple) else (out,)))
        except (Refused, DataError) as e:
            self.reply(getattr(e, "code", 400), {"error": str(e).splitlines()[0]})
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the client went away or stalled: nobody to answer
        except Exception as e:  # a bug must not stop the server: say so, keep serving
            traceback.print_exc()
            self.reply(500, {"error": f"internal error: {type(e).__name__}: {e}".splitlines()[0][:200]})

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def get(self, path):
        if path in ("/", "/index.html"):
            return self.server.page, "text/html; charset=utf-8"
        if path == "/api/info":
            return self.server.player.info()
        raise Refused(404, f"{path[:60]}: no such page (the page is at /)")

    def post(self, path):
        if path not in ("/api/source", "/api/draw", "/api/upload"):
            raise Refused(404, f"{path[:60]}: no such address (POST /api/source, /api/draw or /api/upload)")
        n, limit = self.headers.get("Content-Length", ""), MAX_UPLOAD if path == "/api/upload" else MAX_JSON
        if not n.isdigit():
            raise Refused(411, "a POST needs a Content-Length")
        if int(n) > limit:
            raise Refused(413, f"{path}: {n} bytes, over the {limit} allowed")
        body, player = self.rfile.read(int(n)), self.server.player
        if path == "/api/upload":
            return player.upload(body)
        try:
            req = json.loads(body)
        except ValueError as e:
            raise Refused(400, f"{path}: not JSON ({e})") from None
        if not isinstance(req, dict):
            raise Refused(400, f"{path}: expected a JSON object")
        if path == "/api/source":
            return player.described(player.source(req.get("source")))
        return player.request_draw(req, self.client_address[0])


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them, and a token bucket per client address."""
    daemon_threads = True

    def __init__(self, address, player):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.player, self.slots = player, threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.buckets, self.rate_lock = {}, threading.Lock()  # client address -> (tokens, when)
        with open(PAGE, "rb") as f:
            self.page = f.read()

    def allow(self, ip):
        now = time.monotonic()
        with self.rate_lock:
            if len(self.buckets) > 1024:
                self.buckets.clear()
            tokens, last = self.buckets.get(ip, (BURST, now))
            tokens = min(BURST, tokens + (now - last) * RATE)
            self.buckets[ip] = (tokens - (tokens >= 1), now)
            return tokens >= 1

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            body = b'{"error": "too many connections at once"}'
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def listen(player, host=HOST, port=PORT):
    try:
        return Server((host, port), player)
    except (OSError, OverflowError) as e:
        why = getattr(e, "strerror", None) or e
        raise DataError(f"--host {host} --port {port}: cannot listen there ({why}); "
                        "--port 0 picks any free port") from None


def loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(args):
    """`facesynth.py play`: the page, until Ctrl-C."""
    player = Player(args["ckpt"], args["device"])
    server = listen(player, args["host"], args["port"])
    if not loopback(args["host"]):
        print(f"warning: --host {args['host']}: every machine that reaches this one can use the page; it has "
              "no password. Use the default (127.0.0.1) unless you mean that.", file=sys.stderr)
    host, port = server.server_address[:2]
    print(f"play: http://{'[%s]' % host if ':' in host else host}:{port}/ (G of {args['ckpt']}, step "
          f"{player.run['step']}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        player.latest.stop()
        print("play: stopped", flush=True)


def add_options(p):
    p.add_argument("--ckpt", required=True, help="run folder (runs/NAME) or checkpoint file")
    p.add_argument("--host", default=HOST, help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=number(int, 0), default=PORT, help="0: any free port")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
