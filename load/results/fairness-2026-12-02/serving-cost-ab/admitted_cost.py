import asyncio, importlib.util, subprocess, sys, tempfile, time, json
from pathlib import Path
sys.path.insert(0, "/work/main")
from serve_app import admission as new
from serve_app.client_identity import ClientIdentity
path = Path(tempfile.mkdtemp()) / "admission_old.py"
path.write_text(subprocess.run(["git", "show", "48ba6da:serve_app/admission.py"], cwd="/work/main", check=True, capture_output=True, text=True).stdout)
spec = importlib.util.spec_from_file_location("admission_old", path); old = importlib.util.module_from_spec(spec); sys.modules["admission_old"] = old; spec.loader.exec_module(old)
SCOPE = {"client": ("127.0.0.1", 5000), "headers": [(b"host", b"x"), (b"x-forwarded-for", b"127.0.0.2")]}
async def old_path(n):
    a = old.Admission(old.Limits(max_wait_s=20, max_pending=1024, floor=32, door_wait_s=2))
    t = time.process_time()
    for _ in range(n):
        await a.enter(); a.release()
    return (time.process_time() - t) / n * 1e6
async def new_path(n):
    a = new.Admission(new.Limits(max_wait_s=20, max_pending=1024, floor=32, door_wait_s=2, over_share_door_wait_s=8))
    ident = ClientIdentity(nodes=["127.0.0.1"])
    for i in range(16): a.admit(f"10.0.0.{i}")  # 16 other clients holding a place each
    t = time.process_time()
    for _ in range(n):
        c = ident.client_of(SCOPE)
        await a.enter(c)
        async with a.turn(c):
            pass
        a.release(c)
    return (time.process_time() - t) / n * 1e6
r = {"before_us": [], "after_us": []}
for _ in range(3):
    r["before_us"].append(round(asyncio.run(old_path(50000)), 2)); r["after_us"].append(round(asyncio.run(new_path(50000)), 2))
print(json.dumps(r))
