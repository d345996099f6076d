"""A stand-in for ``xfs_quota -x -D PROJECTS -P PROJID -c CMD MOUNT`` on a kernel without quotas.

It understands the three commands the helper sends (``project -s ID``,
``limit -p bsoft=N bhard=N ID``, ``report -p -b -i -n -N [-L a -U b]``),
prints what the real one prints, and keeps its state (marked directories,
limits, every call) in ``PROJID.fake-state.json`` so tests can check what
was done.  Usage is the apparent size of the marked trees.
"""

import fcntl
import json
import os
import sys


def main(argv):
    args = list(argv)
    projects = projid = command = None
    rest = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-x":
            i += 1
        elif a in ("-D", "-P", "-c"):
            val = args[i + 1]
            if a == "-D":
                projects = val
            elif a == "-P":
                projid = val
            else:
                command = val
            i += 2
        else:
            rest.append(a)
            i += 1
    mount = rest[0] if rest else None
    if not (projects and projid and command and mount):
        print("fake xfs_quota: bad arguments", file=sys.stderr)
        return 2
    if not os.path.isdir(mount):
        print(f"xfs_quota: cannot setup path for mount {mount}: No such file or directory", file=sys.stderr)
        return 0
    if os.environ.get("FAKE_XFS_QUOTA_FAIL") and os.environ["FAKE_XFS_QUOTA_FAIL"] in command:
        print(f"xfs_quota: injected failure for {command}", file=sys.stderr)
        return 1
    state_path = projid + ".fake-state.json"
    with open(state_path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(state_path) as f:
                state = json.load(f)
        except FileNotFoundError:
            state = {"marked": {}, "limits": {}, "calls": []}
        state["calls"].append(command)
        rc = run(command.split(), projects, state)
        tmp = state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, state_path)
    return rc


def _paths(projects, project_id):
    out = []
    with open(projects) as f:
        for line in f:
            ident, _, path = line.strip().partition(":")
            if ident == str(project_id):
                out.append(path)
    return out


def _usage(path):
    size, count = 0, 0
    for root, _dirs, files in os.walk(path):
        count += 1
        for name in files:
            count += 1
            try:
                size += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return size, count


def run(words, projects, state):
    if words[:2] == ["project", "-s"]:
        pid = words[2]
        n = 0
        for path in _paths(projects, pid):
            if os.path.isdir(path):
                state["marked"][path] = int(pid)
                n += 1
            else:
                print(f"xfs_quota: cannot find mount point for path `{path}': No such file or directory",
                      file=sys.stderr)
        print(f"Processed {n} ({projects} and cmdline) paths for project {pid} with recursion depth infinite (-1).")
        return 0
    if words[:2] == ["limit", "-p"]:
        values = dict(w.split("=") for w in words[2:-1])
        state["limits"][words[-1]] = [int(values.get("bsoft", 0)), int(values.get("bhard", 0))]
        return 0
    if words[:1] == ["report"]:
        lo, hi = 0, 2**32
        if "-L" in words:
            lo = int(words[words.index("-L") + 1])
        if "-U" in words:
            hi = int(words[words.index("-U") + 1])
        ids = {int(k) for k in state["limits"]} | set(state["marked"].values())
        for pid in sorted(i for i in ids if lo <= i <= hi):
            used, inodes = 0, 0
            for path, marked in state["marked"].items():
                if marked == pid and os.path.isdir(path):
                    u, c = _usage(path)
                    used, inodes = used + u, inodes + c
            soft, hard = state["limits"].get(str(pid), [0, 0])
            if not (used or inodes or soft or hard):
                continue
            print(f"#{pid:<10} {-(-used // 1024):>10} {soft // 1024:>10} {hard // 1024:>10}     00 [--------] "
                  f"{inodes:>10} {0:>10} {0:>10}     00 [--------]")
        print()
        return 0
    print(f"fake xfs_quota: unsupported command {' '.join(words)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
