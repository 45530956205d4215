"""Run as a script, llm_proxy hands over to a fresh interpreter (issue 12, memory).

CPython keeps a script's syntax tree for as long as the script runs, and this
script is the server: about 11 MiB. So ``python3 llm_proxy.py`` execs an
interpreter whose script is a small program that compiles the file and runs
it as the module ``llm_proxy``. These tests hold it to starting exactly as the
script did: same PID, options and arguments, the same ``sys.path[0]`` (never
the working directory, nor a link's folder), never a planted ``.pyc``, any
file name or path, and no hand-over where it cannot or should not happen.
"""

from __future__ import annotations

import http.client
import importlib.util
import marshal
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from typing import Callable
from unittest import mock

import llm_proxy
from test_llm_proxy import HERE, WAIT, clean_environment, free_port

SCRIPT = os.path.join(HERE, "llm_proxy.py")
VERSION = (0, llm_proxy.__version__, "")  # exit status, stdout, stderr of --version


def poison(folder: str, *names: str) -> None:
    """Modules that stop the interpreter if they are ever imported."""
    for name in names:
        with open(os.path.join(folder, name + ".py"), "w") as file:
            file.write(f"raise SystemExit('{name}.py in {folder} was imported')\n")


def plant_pyc(script: str) -> None:
    """A cached module beside ``script`` that an import would take for it (same mtime and size)."""
    stat = os.stat(script)
    folder = os.path.join(os.path.dirname(script), "__pycache__")
    os.makedirs(folder, exist_ok=True)
    code = compile("raise SystemExit('the planted .pyc ran')", script, "exec")
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") \
        + (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    with open(os.path.join(folder, f"llm_proxy.{sys.implementation.cache_tag}.pyc"), "wb") as file:
        file.write(header + marshal.dumps(code))


class StartsAsTheScriptDid(unittest.TestCase):
    """``--version`` in awkward places: each case once, the same answer as the script gave."""

    def version(self, command: list[str], cwd: str | None = None, stdin: bytes | None = None) -> tuple:
        process = subprocess.run(command, cwd=cwd, env=clean_environment(), capture_output=True,
                                 input=stdin, timeout=WAIT)
        return process.returncode, process.stdout.decode().strip(), process.stderr.decode()

    def copy_to(self, folder: str, name: str = "llm_proxy.py") -> str:
        os.makedirs(folder, exist_ok=True)
        return shutil.copy(SCRIPT, os.path.join(folder, name))

    def test_every_case(self) -> None:
        def working_directory_with_stdlib_names(folder: str) -> dict:
            poison(folder, "json", "socket", "types", "importlib")
            return {"command": [sys.executable, SCRIPT, "--version"], "cwd": folder}

        def linked_with_stdlib_names_beside_the_link(folder: str) -> dict:
            poison(folder, "json", "socket")
            os.symlink(SCRIPT, os.path.join(folder, "proxy.py"))
            return {"command": [sys.executable, os.path.join(folder, "proxy.py"), "--version"]}

        def path_not_utf8(folder: str) -> dict:
            script = self.copy_to(os.path.join(folder, os.fsdecode(b"caf\xe9 d'\xfc")))
            return {"command": [sys.executable, script, "--version"]}

        def argument_not_utf8(folder: str) -> dict:
            return {"command": [sys.executable, SCRIPT, "--version", os.fsdecode(b"\xff\n")]}

        def name_without_py(folder: str) -> dict:  # installed as a command, say
            script = self.copy_to(folder, "llm-proxy")
            os.chmod(script, 0o755)
            return {"command": [script, "--version"]}

        def read_from_stdin(folder: str) -> dict:
            with open(SCRIPT, "rb") as file:
                return {"command": [sys.executable, "-", "--version"], "stdin": file.read()}

        def planted_pyc_beside_it(folder: str) -> dict:
            script = self.copy_to(folder)
            plant_pyc(script)
            return {"command": [sys.executable, script, "--version"]}

        def isolated_mode(folder: str) -> dict:
            poison(folder, "json")
            return {"command": [sys.executable, "-I", SCRIPT, "--version"], "cwd": folder}

        cases: list[Callable[[str], dict]] = [
            working_directory_with_stdlib_names, linked_with_stdlib_names_beside_the_link,
            argument_not_utf8, name_without_py, read_from_stdin, planted_pyc_beside_it,
            isolated_mode]
        if sys.platform.startswith("linux"):  # other systems refuse such a file name
            cases.append(path_not_utf8)
        for case in cases:
            with self.subTest(case.__name__), tempfile.TemporaryDirectory() as folder:
                self.assertEqual(self.version(**case(folder)), VERSION)

    def test_arguments_and_program_name_are_the_scripts(self) -> None:
        code, _, err = self.version([sys.executable, SCRIPT, "--no-such-flag"])
        self.assertEqual(code, 2)
        self.assertTrue(err.startswith("usage: llm_proxy.py "), err)
        self.assertIn("--no-such-flag", err)

    def test_a_profiler_keeps_its_output(self) -> None:
        """Under cProfile there is no hand-over: the profile is written, as before."""
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "profile")
            self.assertEqual(self.version([sys.executable, "-m", "cProfile", "-o", out, SCRIPT,
                                           "--version"]), VERSION)
            self.assertTrue(os.path.exists(out))


@unittest.skipUnless(os.path.exists("/proc/self/cmdline"), "Linux /proc")
class ServingAfterTheHandOver(unittest.TestCase):

    def test_same_pid_options_and_arguments_and_what_ps_shows(self) -> None:
        env = clean_environment()
        env.update(BASE_API_URL="http://127.0.0.1:9/v1", HOST="127.0.0.1", PORT=str(free_port()))
        options = ["-u", "-X", "utf8", "-W", "error::ResourceWarning"]
        process = subprocess.Popen([sys.executable, *options, SCRIPT], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            self.assertIn("listening", process.stdout.readline())
            with open(f"/proc/{process.pid}/cmdline", "rb") as file:
                argv = os.fsdecode(file.read()).split("\0")[:-1]
            conn = http.client.HTTPConnection("127.0.0.1", int(env["PORT"]), timeout=WAIT)
            conn.request("GET", "/health")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        finally:
            process.terminate()
            process.communicate(timeout=WAIT)
        self.assertEqual(process.returncode, 0)
        c = argv.index("-c")
        comment, program = argv[c + 1].split("\n", 1)
        self.assertEqual(program, llm_proxy._COMPILE_AND_RUN)
        self.assertEqual(argv[c + 2:], [os.path.realpath(SCRIPT), os.path.dirname(os.path.realpath(SCRIPT)),
                                        SCRIPT], "the file, sys.path[0], then the original argv")
        if sys.version_info >= (3, 10):  # the options as typed, and the command first in what ps shows
            self.assertEqual(argv[1:c], options)
            self.assertEqual(comment, f"# {sys.executable} {' '.join(options)} {SCRIPT}")
        else:
            self.assertIn("-Xutf8", "".join(argv[1:c]))
            self.assertIn("-Werror::ResourceWarning", "".join(argv[1:c]))


@unittest.skipUnless(os.name == "posix", "the hand-over is POSIX only")
class WhenThereIsNoHandOver(unittest.TestCase):

    def attempts(self) -> list:
        tried: list = []

        def refuse(executable: str, argv: list) -> None:
            tried.append((executable, argv))
            raise PermissionError("exec refused")
        with mock.patch.object(llm_proxy.os, "execv", refuse):
            self.assertIsNone(llm_proxy.hand_over())
        return tried

    def test_an_exec_that_fails_returns_and_the_script_serves_itself(self) -> None:
        tried = self.attempts()
        self.assertEqual(len(tried), 1)
        self.assertEqual(tried[0][0], sys.executable)
        program = tried[0][1][tried[0][1].index("-c") + 1]
        self.assertTrue(program.startswith("# ") and program.endswith(llm_proxy._COMPILE_AND_RUN))

    def test_none_is_tried_under_a_profiler_or_a_tracer(self) -> None:
        for setter in (sys.setprofile, sys.settrace):
            with self.subTest(setter.__name__):
                setter(lambda *args: None)
                try:
                    tried = self.attempts()
                finally:
                    setter(None)
                self.assertEqual(tried, [])

    def test_an_argument_cannot_end_the_comment_that_names_the_command(self) -> None:
        typed = ["llm_proxy.py", "x\nraise SystemExit(9)\r", os.fsdecode(b"\xff")]
        with mock.patch.object(llm_proxy.sys, "argv", typed), \
                mock.patch.object(llm_proxy.sys, "orig_argv", ["python3", *typed], create=True):
            program = llm_proxy.handed_over_program()
        comment, rest = program.split("\n", 1)
        self.assertEqual(rest, llm_proxy._COMPILE_AND_RUN)
        self.assertEqual(comment, "# python3 llm_proxy.py x raise SystemExit(9)  \\udcff")
        compile(program, "<handed over>", "exec")  # and it is still a program


if __name__ == "__main__":
    unittest.main()
