// Build the prebuilt JupyterLab extension into ../jupyter_ext/labextension with @jupyterlab/builder.
// `jupyter labextension build` now hands over to jupyter_builder, which fetches JupyterLab's core
// metadata from the network; the builder itself only needs the core package.json that the
// installed jupyterlab ships (its staging folder), so we give it that.
import { spawnSync } from "node:child_process";

const python = process.env.PYTHON || "python3";
const probe = spawnSync(python, ["-c",
  "import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), 'staging'))"], { encoding: "utf8" });
if (probe.status !== 0) {
  console.error(`build-lab: cannot find JupyterLab's staging folder with ${python} (pip install jupyterlab):\n${probe.stderr}`);
  process.exit(1);
}
const core = probe.stdout.trim();
const args = ["node_modules/@jupyterlab/builder/lib/build-labextension.js", "--core-path", core, "."];
if (process.argv.includes("--development")) args.splice(1, 0, "--development");
const run = spawnSync(process.execPath, args, { stdio: "inherit" });
process.exit(run.status === null ? 1 : run.status);
