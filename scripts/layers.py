#!/usr/bin/env python3
"""The engine's layers: no import cycle between the folders of src/.

Every `src/<folder>/` is one layer; its `mod.rs` says, in a doc line

    //! May use: `vocab`, `http`.          (or: //! May use: nothing.)

which other folders its files may name. This script reads every `crate::…` path in
src/**.rs (`use crate::a::B;`, `use crate::{a::B, c::{D, E}};`, `crate::a::f()` in
expressions, and `super::` paths that climb out of a folder), comments and string
literals stripped, test code included, and maps each to the folder that defines it
(a root re-export such as `crate::Config` to the module lib.rs re-exports it from).
It fails when

- a file names a folder its folder's `May use:` line does not list, or
- the folders' graph (the uses actually found, and the `May use:` lines) has a cycle.

Cycles between files inside one folder are allowed. `src/lib.rs` (the facade: module
declarations and re-exports) and the files it mounts with `#[path]` (the hidden
`__fuzz` entry points) may use every folder; nothing may use items defined in lib.rs
itself. A top-level `src/<name>.rs` other than those counts as a folder of its own.

Usage (from anywhere in the repository):

    python3 scripts/layers.py            check; prints the layer order
    python3 scripts/layers.py --graph    also print every edge with its count
    python3 scripts/layers.py --why A B  every reference from folder A to folder B
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip(text):
    """`text` with comments, string and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)

    def blank(s):
        return "".join(c if c == "\n" else " " for c in s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif c in "rb" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.compile(r'b?r(#*)"').match(text, i)
            if m:
                end = text.find('"' + m.group(1), m.end())
                end = n if end < 0 else end + 1 + len(m.group(1))
                out.append(blank(text[i:end]))
                i = end
            elif text.startswith('b"', i) or text.startswith("b'", i):
                out.append(" ")
                i += 1
            else:
                out.append(c)
                i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i : j + 1]))
            i = j + 1
        elif c == "'":
            m = re.compile(r"'(\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|.)|[^\\'\n])'").match(text, i)
            if m:
                out.append(blank(m.group(0)))
                i = m.end()
            else:
                out.append(c)  # a lifetime
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching(text, i):
    """Index just past the bracket closing the one at `text[i]`."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    stack = [pairs[text[i]]]
    j = i + 1
    while j < len(text) and stack:
        c = text[j]
        if c in pairs:
            stack.append(pairs[c])
        elif c == stack[-1]:
            stack.pop()
        j += 1
    return j


def test_ranges(text):
    """Spans of items under `#[cfg(test)]` (inline test modules, test-only items)."""
    spans = []
    for m in re.finditer(r"#\[cfg\(test\)\]", text):
        j = m.end()
        while j < len(text) and text[j] not in "{;":
            j += 1
        if j < len(text) and text[j] == "{":
            spans.append((m.start(), matching(text, j)))
        else:
            spans.append((m.start(), j))
    return spans


def heads(text, i):
    """First segments of the path(s) starting at `text[i]` (after `crate::`)."""
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        end = matching(text, i)
        inner = text[i + 1 : end - 1]
        items, depth, cur = [], 0, ""
        for c in inner:
            if c == "," and depth == 0:
                items.append(cur)
                cur = ""
                continue
            depth += c == "{"
            depth -= c == "}"
            cur += c
        items.append(cur)
        found = []
        for item in items:
            m = re.match(r"\s*(" + IDENT + ")", item)
            if m and m.group(1) != "self":
                found.append(m.group(1))
        return found
    m = re.compile(IDENT).match(text, i)
    return [m.group(0)] if m else []


def use_names(tree):
    """The names a use tree (after `root::`) brings in: `{a, b::C, d as e}` -> a, C, e."""
    tree = tree.strip()
    if tree.startswith("{"):
        inner = tree[1 : matching(tree, 0) - 1]
        items, depth, cur = [], 0, ""
        for c in inner:
            if c == "," and depth == 0:
                items.append(cur)
                cur = ""
                continue
            depth += c == "{"
            depth -= c == "}"
            cur += c
        items.append(cur)
        return [n for item in items if item.strip() for n in use_names(item)]
    m = re.search(r"\bas\s+(" + IDENT + r")\s*$", tree)
    if m:
        return [m.group(1)]
    if "::" in tree:
        return use_names(tree.split("::", 1)[1])
    return [] if tree in ("self", "*") else [tree]


class Crate:
    def __init__(self):
        lib = strip(open(os.path.join(SRC, "lib.rs")).read())
        # Files lib.rs mounts with #[path]: facades, like lib.rs.
        self.mounted = {}
        raw = open(os.path.join(SRC, "lib.rs")).read()
        mount = r'#\[path\s*=\s*"([^"]+)"\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(' + IDENT + ")"
        for m in re.finditer(mount, raw):
            self.mounted[m.group(2)] = m.group(1)
        self.modules = set(re.findall(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", lib))
        # Root imports and re-exports (`use api::{config, …}`, `pub use config::Config`):
        # name -> the root name it comes through, resolved to a module in `resolve`.
        self.reexports = {}
        for m in re.finditer(r"(?m)^(?:pub(?:\([^)]*\))?\s+)?use\s+(" + IDENT + r")\s*::", lib):
            end = lib.find(";", m.end())
            for name in use_names(lib[m.end() : end]):
                self.reexports.setdefault(name, m.group(1))
        # Items defined in lib.rs itself.
        self.lib_items = set(re.findall(r"\b(?:fn|struct|enum|const|static|mod|trait|type)\s+(" + IDENT + ")", lib))

    def resolve(self, head):
        """The folder a `crate::<head>` names, or (None, reason)."""
        if head in self.modules and head not in self.mounted:
            return head, None
        seen = set()
        while head in self.reexports and head not in seen:
            seen.add(head)
            head = self.reexports[head]
            if head in self.modules and head not in self.mounted:
                return head, None
        if seen:
            return None, "external re-export"
        if head in self.lib_items or head in self.mounted:
            return None, "lib"
        return None, "unknown"


def unit_of_file(rel):
    """`src/a/b.rs` -> `a`; `src/a.rs` -> `a`; lib.rs -> None."""
    parts = rel.split("/")
    if len(parts) == 1:
        stem = parts[0][:-3]
        return None if stem == "lib" else stem
    return parts[0]


def module_path(rel):
    """The module path of a file: `a/b.rs` -> [a, b]; `a/mod.rs` -> [a]; `a.rs` -> [a]."""
    parts = rel[:-3].split("/")
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        parts = []
    return parts


def references(crate, rel, text):
    """(line, unit, head, in_test) for every reference out of file `rel`."""
    code = strip(text)
    tests = test_ranges(code)
    me = unit_of_file(rel)
    mpath = module_path(rel)
    out = []

    def line_of(i):
        return code.count("\n", 0, i) + 1

    def in_test(i):
        return any(a <= i < b for a, b in tests)

    for m in re.finditer(r"(?<![\w$])crate\s*::", code):
        for head in heads(code, m.end()):
            out.append((line_of(m.start()), head, in_test(m.start()), "crate"))
    for m in re.finditer(r"(?<![\w$:])((?:super\s*::\s*)+)", code):
        k = m.group(1).count("super")
        base = mpath[:]
        if in_test(m.start()):
            k -= 1  # inside the inline `mod tests`
        if k <= 0:
            continue
        if k > len(base):
            out.append((line_of(m.start()), "<beyond crate>", in_test(m.start()), "super"))
            continue
        base = base[: len(base) - k]
        if base:
            # Still inside a root module: that module's folder.
            out.append((line_of(m.start()), "::" + base[0], in_test(m.start()), "super"))
        else:
            for head in heads(code, m.end()):
                out.append((line_of(m.start()), head, in_test(m.start()), "super"))
    result = []
    for line, head, test, how in out:
        if head.startswith("::"):
            unit, why = head[2:], None
        else:
            unit, why = crate.resolve(head)
        result.append((line, unit, head, test, why, how))
    return me, result


def files():
    for dirpath, _, names in os.walk(SRC):
        for name in sorted(names):
            if name.endswith(".rs"):
                full = os.path.join(dirpath, name)
                yield os.path.relpath(full, SRC).replace(os.sep, "/"), full


def declared(folder):
    """The folders `src/<folder>/mod.rs` says it may use, or None without the line."""
    path = os.path.join(SRC, folder, "mod.rs")
    if not os.path.exists(path):
        return None
    lines = open(path).read().splitlines()
    for k, line in enumerate(lines):
        m = re.match(r"\s*//!\s*May use:\s*(.*)$", line)
        if not m:
            continue
        text = m.group(1)
        # The list may continue on the following `//!` lines until a full stop.
        j = k + 1
        while not text.rstrip().endswith(".") and j < len(lines) and lines[j].lstrip().startswith("//!"):
            text += " " + lines[j].lstrip()[3:]
            j += 1
        if re.match(r"\s*nothing\b", text):
            return set()
        return set(re.findall(r"`(" + IDENT + ")`", text.split(".")[0] if "." in text else text))
    return None


def sccs(nodes, edges):
    """Tarjan's strongly connected components."""
    index, low, on, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return comps


def shortest_cycle(comp, edges):
    """A shortest cycle inside a strongly connected component, as a closed path."""
    best = None
    for start in comp:
        prev, queue = {start: None}, [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(edges.get(v, ())):
                if w not in comp:
                    continue
                if w == start:
                    path = [start] + list(reversed(path_back(prev, v))) + [start]
                    if best is None or len(path) < len(best):
                        best = path
                    queue = []
                    break
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
    return best or comp + comp[:1]


def path_back(prev, v):
    """v, its predecessor, … up to (not including) the BFS start."""
    out = []
    while prev[v] is not None:
        out.append(v)
        v = prev[v]
    return out


def order(nodes, edges):
    """Layers bottom-up: each folder after every folder it uses (None on a cycle)."""
    level = {}

    def depth(v, seen=()):
        if v in level:
            return level[v]
        if v in seen:
            return None
        ds = [depth(w, seen + (v,)) for w in edges.get(v, ())]
        if any(d is None for d in ds):
            return None
        level[v] = 1 + max(ds, default=-1)
        return level[v]

    for v in nodes:
        if depth(v) is None:
            return None
    return level


def main(argv):
    crate = Crate()
    evidence = {}  # (from, to) -> [(file, line, head, test)]
    problems = []
    units = set()
    for rel, full in files():
        me, refs = references(crate, rel, open(full, encoding="utf-8").read())
        if me is None or me in crate.mounted or rel[:-3] in crate.mounted.values() or rel in crate.mounted.values():
            continue  # the facade may use everything
        units.add(me)
        for line, unit, head, test, why, how in refs:
            if unit is None:
                if why == "lib":
                    problems.append(f"src/{rel}:{line}: `{how}::{head}` is defined in lib.rs (the facade); move it into a folder")
                elif why == "unknown":
                    problems.append(f"src/{rel}:{line}: `{how}::{head}`: unknown root name (not a module or root re-export)")
                continue
            if unit != me:
                evidence.setdefault((me, unit), []).append((rel, line, head, test))
    edges = {}
    for (a, b) in evidence:
        edges.setdefault(a, set()).add(b)
        units.add(b)

    for u in sorted(units):
        if not os.path.isdir(os.path.join(SRC, u)):
            problems.append(
                f"src/{u}.rs: a module outside the layer folders; move it into the folder of "
                f"its layer (src/<folder>/, declared in that folder's mod.rs)"
            )
    folders = sorted(u for u in units if os.path.isdir(os.path.join(SRC, u)))
    allowed = {}
    for f in folders:
        d = declared(f)
        if d is None:
            problems.append(f"src/{f}/mod.rs: no `//! May use: ...` doc line")
            continue
        for g in sorted(d - set(folders)):
            problems.append(f"src/{f}/mod.rs: `May use:` names `{g}`, not a folder of src/")
        allowed[f] = d & set(folders)
    for (a, b), ev in sorted(evidence.items()):
        if a in allowed and b not in allowed[a]:
            rel, line, head, _ = ev[0]
            more = f" (and {len(ev) - 1} more)" if len(ev) > 1 else ""
            problems.append(
                f"src/{rel}:{line}: `{a}` uses `{b}` (`crate::{head}`){more}, "
                f"which src/{a}/mod.rs does not allow (`May use:`)"
            )

    combined = {a: set(bs) for a, bs in edges.items()}
    for a, d in allowed.items():
        combined.setdefault(a, set()).update(d)
    for comp in sccs(units | set(allowed), combined):
        if len(comp) > 1:
            cycle = shortest_cycle(comp, combined)
            lines = [f"cycle between folders: {' -> '.join(cycle)}"]
            for a, b in zip(cycle, cycle[1:]):
                if (a, b) in evidence:
                    rel, line, head, _ = evidence[(a, b)][0]
                    lines.append(f"    {a} -> {b}: src/{rel}:{line} (`{head}`), {len(evidence[(a, b)])} reference(s)")
                else:
                    lines.append(f"    {a} -> {b}: declared in src/{a}/mod.rs (`May use:`)")
            problems.append("\n".join(lines))

    if len(argv) >= 3 and argv[0] == "--why":
        for rel, line, head, test in evidence.get((argv[1], argv[2]), []):
            print(f"src/{rel}:{line}: crate::{head}{'  (test)' if test else ''}")
        return 0
    if argv[:1] == ["--graph"]:
        for a in sorted(units):
            outs = sorted(edges.get(a, ()))
            desc = ", ".join(
                f"{b} ({len(evidence[(a, b)])}{', tests only' if all(t for *_, t in evidence[(a, b)]) else ''})"
                for b in outs
            )
            print(f"{a} -> {desc or '-'}")
        print()

    if problems:
        print("\n".join(problems))
        print(f"\nlayers: FAILED ({len(problems)} problem(s))")
        return 1
    level = order(units, combined)
    by = {}
    for u, l in level.items():
        by.setdefault(l, []).append(u)
    for l in sorted(by):
        print(f"layer {l}: {', '.join(sorted(by[l]))}")
    print(f"layers: ok ({len(units)} folders, {sum(len(v) for v in evidence.values())} cross-folder references, no cycle)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
