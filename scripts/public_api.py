#!/usr/bin/env python3
"""keypool's public API as text, one line per item, to diff against api/keypool.txt.

Reads the rustdoc JSON of the engine crate (nightly rustdoc), walks the public tree from
the crate root as a user sees it (re-exports under the name they are exported as, not
the private module that defines them), and prints every public item with its signature:
modules, structs and their public fields, enums and their variants, traits and their
items, functions, methods of inherent impls, trait impls (auto traits included: `Send`,
`Sync`, `Unpin`, …), constants with their values, type aliases, statics, macros.
`#[doc(hidden)]` items (`__capi`, `__fuzz`) are not public API and are left out, as
rustdoc leaves them out.

    python3 scripts/public_api.py                 build the JSON, compare with api/keypool.txt
    python3 scripts/public_api.py --bless         build the JSON, rewrite api/keypool.txt
    python3 scripts/public_api.py --json FILE     use an existing rustdoc JSON file
    python3 scripts/public_api.py --print         print the listing

The JSON comes from
    cargo +nightly rustdoc -p keypool --lib --all-features -- -Z unstable-options --output-format json
A difference exits 1 and prints it as a unified diff ('-' lines: removed or changed).
"""

import difflib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "api", "keypool.txt")
# Compiler-internal marker traits rustdoc lists as auto impls; they come and go with the
# nightly toolchain, so they are left out (Send, Sync, Unpin, UnwindSafe stay).
UNSTABLE_MARKERS = {"core::marker::Freeze", "core::marker::UnsafeUnpin", "core::marker::StructuralPartialEq"}


def build():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    cmd = [
        "cargo", "+nightly", "rustdoc", "-q", "-p", "keypool", "--lib", "--all-features", "--locked",
        "--", "-Z", "unstable-options", "--output-format", "json",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return os.path.join(target, "doc", "keypool.json")


class Api:
    def __init__(self, doc):
        self.doc = doc
        self.index = doc["index"]
        self.paths = doc.get("paths", {})
        self.public = {}  # id -> public path, filled while walking
        self.lines = []

    # ----- names -----------------------------------------------------------------

    def name_of(self, id_, written):
        id_ = str(id_) if id_ is not None else None
        if id_ in self.public:
            return self.public[id_]
        p = self.paths.get(id_) if id_ is not None else None
        if p is not None:
            path = p["path"]
            if p.get("crate_id", 0) == 0:
                # Crate-local but not public: its internal path (a leak, worth seeing).
                return "keypool(private)::" + "::".join(path[1:])
            return "::".join(path)
        return written

    # ----- types -----------------------------------------------------------------

    def args(self, a):
        if not a:
            return ""
        if "angle_bracketed" in a:
            ab = a["angle_bracketed"]
            parts = []
            for g in ab.get("args", []):
                if "type" in g:
                    parts.append(self.ty(g["type"]))
                elif "lifetime" in g:
                    parts.append(g["lifetime"])
                elif "const" in g:
                    c = g["const"]
                    parts.append(c.get("expr", "?"))
                else:
                    parts.append("_")
            for c in ab.get("constraints", []):
                b = c.get("binding", {})
                if "equality" in b:
                    eq = b["equality"]
                    rhs = self.ty(eq["type"]) if "type" in eq else json.dumps(eq, sort_keys=True)
                    parts.append(f"{c['name']}{self.args(c.get('args'))} = {rhs}")
                else:
                    parts.append(f"{c['name']}: {self.bounds(b.get('constraint', []))}")
            return "<" + ", ".join(parts) + ">" if parts else ""
        if "parenthesized" in a:
            p = a["parenthesized"]
            out = "(" + ", ".join(self.ty(t) for t in p.get("inputs", [])) + ")"
            if p.get("output"):
                out += " -> " + self.ty(p["output"])
            return out
        return ""

    def path(self, p):
        return self.name_of(p.get("id"), p.get("path") or p.get("name")) + self.args(p.get("args"))

    def ty(self, t):
        if t is None:
            return "()"
        if "resolved_path" in t:
            return self.path(t["resolved_path"])
        if "generic" in t:
            return t["generic"]
        if "primitive" in t:
            return t["primitive"]
        if "borrowed_ref" in t:
            r = t["borrowed_ref"]
            lt = (r["lifetime"] + " ") if r.get("lifetime") else ""
            return "&" + lt + ("mut " if r.get("is_mutable") else "") + self.ty(r["type"])
        if "raw_pointer" in t:
            r = t["raw_pointer"]
            return ("*mut " if r.get("is_mutable") else "*const ") + self.ty(r["type"])
        if "slice" in t:
            return "[" + self.ty(t["slice"]) + "]"
        if "array" in t:
            return "[" + self.ty(t["array"]["type"]) + "; " + str(t["array"]["len"]) + "]"
        if "tuple" in t:
            items = [self.ty(x) for x in t["tuple"]]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if "dyn_trait" in t:
            d = t["dyn_trait"]
            parts = [self.poly(x) for x in d.get("traits", [])]
            if d.get("lifetime"):
                parts.append(d["lifetime"])
            return "dyn " + " + ".join(parts)
        if "impl_trait" in t:
            return "impl " + self.bounds(t["impl_trait"])
        if "function_pointer" in t:
            f = t["function_pointer"]
            return "fn" + self.sig(f.get("sig") or f.get("decl"))
        if "qualified_path" in t:
            q = t["qualified_path"]
            tr = q.get("trait")
            base = f"<{self.ty(q['self_type'])} as {self.path(tr)}>" if tr else self.ty(q["self_type"])
            return base + "::" + q["name"] + self.args(q.get("args"))
        if "infer" in t:
            return "_"
        return json.dumps(t, sort_keys=True)

    def poly(self, x):
        gp = x.get("generic_params") or []
        pre = ("for<" + ", ".join(self.param(g) for g in gp) + "> ") if gp else ""
        return pre + self.path(x["trait"])

    def bounds(self, bs):
        out = []
        for b in bs or []:
            if "trait_bound" in b:
                tb = b["trait_bound"]
                mod = tb.get("modifier", "none")
                pre = {"maybe": "?", "maybe_const": "~const "}.get(mod, "")
                out.append(pre + self.poly(tb))
            elif "outlives" in b:
                out.append(b["outlives"])
            else:
                out.append(json.dumps(b, sort_keys=True))
        return " + ".join(out)

    def param(self, g):
        k = g.get("kind", {})
        if "lifetime" in k:
            o = k["lifetime"].get("outlives") or []
            return g["name"] + (": " + " + ".join(o) if o else "")
        if "type" in k:
            tk = k["type"]
            if tk.get("is_synthetic"):
                return ""
            s = g["name"]
            if tk.get("bounds"):
                s += ": " + self.bounds(tk["bounds"])
            if tk.get("default"):
                s += " = " + self.ty(tk["default"])
            return s
        if "const" in k:
            return "const " + g["name"] + ": " + self.ty(k["const"]["type"])
        return g.get("name", "?")

    def generics(self, g):
        if not g:
            return "", ""
        ps = [p for p in (self.param(x) for x in g.get("params", [])) if p]
        params = "<" + ", ".join(ps) + ">" if ps else ""
        preds = []
        for w in g.get("where_predicates", []):
            if "bound_predicate" in w:
                b = w["bound_predicate"]
                preds.append(self.ty(b["type"]) + ": " + self.bounds(b["bounds"]))
            elif "lifetime_predicate" in w:
                lp = w["lifetime_predicate"]
                preds.append(lp["lifetime"] + ": " + " + ".join(lp["outlives"]))
            elif "eq_predicate" in w:
                e = w["eq_predicate"]
                preds.append(self.ty(e["lhs"]) + " = " + json.dumps(e["rhs"], sort_keys=True))
        where = (" where " + ", ".join(preds)) if preds else ""
        return params, where

    def sig(self, s):
        ins = []
        for name, t in s.get("inputs", []):
            if name == "self":
                r = self.ty(t)
                ins.append({"Self": "self", "&Self": "&self", "&mut Self": "&mut self"}.get(r, "self: " + r))
            else:
                ins.append(f"{name}: {self.ty(t)}")
        out = "(" + ", ".join(ins) + ")"
        if s.get("output") is not None:
            out += " -> " + self.ty(s["output"])
        return out

    # ----- items -----------------------------------------------------------------

    def attrs(self, item):
        out = []
        for a in item.get("attrs", []):
            s = a if isinstance(a, str) else json.dumps(a, sort_keys=True)
            if "non_exhaustive" in s:
                out.append("#[non_exhaustive] ")
            elif "repr" in s:
                out.append(s + " ")
        return "".join(out)

    def fn_line(self, name, f):
        h = f.get("header", {})
        pre = "".join(
            w for w, on in (("const ", h.get("is_const")), ("async ", h.get("is_async")), ("unsafe ", h.get("is_unsafe"))) if on
        )
        params, where = self.generics(f.get("generics"))
        return f"{pre}fn {name}{params}{self.sig(f['sig'])}{where}"

    def emit(self, path, text):
        self.lines.append(f"{path}: {text}")

    def impls(self, path, impl_ids):
        for iid in impl_ids:
            imp = self.index.get(str(iid))
            if imp is None:
                continue
            i = imp["inner"]["impl"]
            if i.get("blanket_impl") is not None:
                continue
            if i.get("trait") and self.name_of(i["trait"].get("id"), "") in UNSTABLE_MARKERS:
                continue
            params, where = self.generics(i.get("generics"))
            if i.get("trait") is None:
                for mid in i.get("items", []):
                    m = self.index.get(str(mid))
                    if m is None or m.get("visibility") != "public":
                        continue
                    self.member(path, m)
            else:
                neg = "!" if i.get("is_negative") else ""
                uns = "unsafe " if i.get("is_unsafe") else ""
                self.emit(path, f"{uns}impl{params} {neg}{self.path(i['trait'])} for {self.ty(i['for'])}{where}")

    def member(self, path, m):
        inner = m["inner"]
        name = m["name"]
        if "function" in inner:
            self.emit(f"{path}::{name}", self.attrs(m) + "pub " + self.fn_line(name, inner["function"]))
        elif "assoc_const" in inner:
            c = inner["assoc_const"]
            self.emit(f"{path}::{name}", f"pub const {name}: {self.ty(c['type'])} = {c.get('value')}")
        elif "assoc_type" in inner:
            t = inner["assoc_type"]
            self.emit(f"{path}::{name}", f"type {name}" + (" = " + self.ty(t["type"]) if t.get("type") else ""))
        else:
            self.emit(f"{path}::{name}", json.dumps(sorted(inner.keys())))

    def item(self, path, item, seen):
        inner = item["inner"]
        kind = next(iter(inner))
        body = inner[kind]
        name = path.rsplit("::", 1)[-1]
        attrs = self.attrs(item)
        if kind == "module":
            self.emit(path, "mod " + name)
            self.module(path, body, seen)
        elif kind == "struct":
            params, where = self.generics(body.get("generics"))
            k = body["kind"]
            if k == "unit" or (isinstance(k, dict) and "unit" in k):
                self.emit(path, f"{attrs}pub struct {name}{params}{where};")
            elif "tuple" in k:
                fields = []
                for fid in k["tuple"]:
                    f = self.index.get(str(fid)) if fid is not None else None
                    fields.append(self.ty(f["inner"]["struct_field"]) if f and f.get("visibility") == "public" else "_")
                self.emit(path, f"{attrs}pub struct {name}{params}({', '.join(fields)}){where};")
            else:
                plain = k["plain"]
                more = " /* private fields */" if plain.get("has_stripped_fields") else ""
                self.emit(path, f"{attrs}pub struct {name}{params}{where} {{ … }}{more}")
                for fid in plain.get("fields", []):
                    f = self.index[str(fid)]
                    if f.get("visibility") == "public":
                        self.emit(f"{path}::{f['name']}", f"pub {f['name']}: {self.ty(f['inner']['struct_field'])}")
            self.impls(path, body.get("impls", []))
        elif kind == "enum":
            params, where = self.generics(body.get("generics"))
            self.emit(path, f"{attrs}pub enum {name}{params}{where}")
            for vid in body.get("variants", []):
                v = self.index[str(vid)]
                vk = v["inner"]["variant"]["kind"]
                disc = v["inner"]["variant"].get("discriminant")
                d = f" = {disc['value']}" if disc else ""
                vpath = f"{path}::{v['name']}"
                if vk == "plain":
                    self.emit(vpath, f"{self.attrs(v)}variant {v['name']}{d}")
                elif "tuple" in vk:
                    fs = [self.ty(self.index[str(f)]["inner"]["struct_field"]) if f is not None else "_" for f in vk["tuple"]]
                    self.emit(vpath, f"{self.attrs(v)}variant {v['name']}({', '.join(fs)}){d}")
                else:
                    st = vk["struct"]
                    more = " /* private fields */" if st.get("has_stripped_fields") else ""
                    self.emit(vpath, f"{self.attrs(v)}variant {v['name']} {{ … }}{more}")
                    for fid in st.get("fields", []):
                        f = self.index[str(fid)]
                        self.emit(f"{vpath}::{f['name']}", f"{f['name']}: {self.ty(f['inner']['struct_field'])}")
            self.impls(path, body.get("impls", []))
        elif kind == "function":
            self.emit(path, attrs + "pub " + self.fn_line(name, body))
        elif kind == "constant":
            c = body.get("const", {})
            self.emit(path, f"pub const {name}: {self.ty(body['type'])} = {c.get('value') or c.get('expr')}")
        elif kind == "static":
            self.emit(path, f"pub static {'mut ' if body.get('is_mutable') else ''}{name}: {self.ty(body['type'])}")
        elif kind == "type_alias":
            params, where = self.generics(body.get("generics"))
            self.emit(path, f"pub type {name}{params}{where} = {self.ty(body['type'])}")
        elif kind == "trait":
            params, where = self.generics(body.get("generics"))
            sup = (": " + self.bounds(body.get("bounds"))) if body.get("bounds") else ""
            uns = "unsafe " if body.get("is_unsafe") else ""
            self.emit(path, f"{attrs}pub {uns}trait {name}{params}{sup}{where}")
            for mid in body.get("items", []):
                m = self.index.get(str(mid))
                if m is None:
                    continue
                mi = m["inner"]
                if "function" in mi:
                    prov = " { … }" if mi["function"].get("has_body") else ""
                    self.emit(f"{path}::{m['name']}", self.fn_line(m["name"], mi["function"]) + prov)
                else:
                    self.member(path, m)
            for iid in body.get("implementations", []):
                imp = self.index.get(str(iid))
                if imp is not None:
                    i = imp["inner"]["impl"]
                    self.emit(path, f"impl {name} for {self.ty(i['for'])}")
        elif kind == "macro":
            self.emit(path, f"macro {name}!")
        elif kind == "proc_macro":
            self.emit(path, f"proc macro {name}")
        else:
            self.emit(path, kind)

    def module(self, path, m, seen):
        for cid in m.get("items", []):
            c = self.index.get(str(cid))
            if c is None:
                continue
            inner = c["inner"]
            if "use" in inner:
                u = inner["use"]
                if u.get("is_glob"):
                    self.emit(path, f"pub use {u['source']}::*")
                    continue
                target = self.index.get(str(u.get("id"))) if u.get("id") is not None else None
                sub = f"{path}::{u['name']}"
                if target is None:
                    # An external item or crate: named by its source path.
                    self.emit(sub, f"pub use {u['source']}")
                    continue
                self.visit(sub, str(u["id"]), target, seen)
            elif c.get("visibility") == "public":
                self.visit(f"{path}::{c['name']}", str(cid), c, seen)

    def visit(self, path, id_, item, seen):
        if (path, id_) in seen:
            return
        seen.add((path, id_))
        self.public.setdefault(id_, path)
        self.item(path, item, seen)

    def listing(self):
        root = self.index[str(self.doc["root"])]
        # First pass names every public item by its public path; the second prints
        # signatures with those names.
        self.visit("keypool", str(self.doc["root"]), root, set())
        self.lines = []
        self.visit("keypool", str(self.doc["root"]), root, set())
        return sorted(set(self.lines))


def main(argv):
    json_file = None
    if "--json" in argv:
        json_file = argv[argv.index("--json") + 1]
    if json_file is None:
        json_file = build()
    with open(json_file) as f:
        doc = json.load(f)
    lines = Api(doc).listing()
    text = "".join(line + "\n" for line in lines)
    if "--print" in argv:
        sys.stdout.write(text)
        return 0
    if "--bless" in argv:
        os.makedirs(os.path.dirname(BASELINE), exist_ok=True)
        with open(BASELINE, "w") as f:
            f.write(text)
        print(f"public API: {len(lines)} lines written to api/keypool.txt")
        return 0
    with open(BASELINE) as f:
        base = f.read()
    if base == text:
        print(f"public API: unchanged ({len(lines)} lines, api/keypool.txt)")
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(base.splitlines(True), text.splitlines(True), "api/keypool.txt", "this build")
    )
    print(
        "\npublic API: CHANGED (above: '-' removed or changed, '+' added). If intended, "
        "run `python3 scripts/public_api.py --bless` and commit api/keypool.txt."
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
