//! Taking turns: long-lived `enforcer-bench serve` processes, one or more
//! per scenario, each in its session or cgroup, measure short batches one
//! after the other, so that drift on the machine hits every scenario alike.
//! Used by `enforcer-bench turns` (in the VM) and by `cargo xtask bench`
//! (on the host).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

/// A `serve` process measuring for one scenario. Dropping it closes its
/// stdin (it exits) and reaps it, killing it if it has not exited in 10 s.
pub struct Worker {
    pub scenario: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Starts `cmd`, a command that ends in `enforcer-bench serve` (possibly
    /// through `enforcer run`).
    pub fn spawn(scenario: &str, mut cmd: Command) -> Result<Worker> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {scenario} worker: {cmd:?}"))?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout pipe")?);
        Ok(Worker {
            scenario: scenario.to_owned(),
            child,
            stdin: Some(stdin),
            stdout,
        })
    }

    /// Runs one batch (`OP TARGET N`, see `serve`) and returns its ns per
    /// operation.
    pub fn batch(&mut self, request: &str) -> Result<f64> {
        let stdin = self.stdin.as_mut().context("worker closed")?;
        writeln!(stdin, "{request}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("the {} worker is gone", self.scenario))?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        ensure!(
            !line.is_empty(),
            "the {} worker exited during `{request}` (its error is above)",
            self.scenario
        );
        let answer: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("the {} worker answered {line:?}", self.scenario))?;
        answer["ns_per_op"]
            .as_f64()
            .with_context(|| format!("the {} worker answered {line:?}", self.scenario))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Alternates batches between `workers`: one warm-up batch each, then
/// `batches` cycles in which every worker runs `request` once, in an order
/// rotated every cycle. Returns the batch figures per scenario (workers of
/// the same scenario pooled).
pub fn interleave(
    workers: &mut [Worker],
    request: &str,
    batches: usize,
) -> Result<BTreeMap<String, Vec<f64>>> {
    for worker in workers.iter_mut() {
        worker.batch(request)?;
    }
    let mut figures: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for cycle in 0..batches {
        for i in 0..workers.len() {
            let worker = &mut workers[(cycle + i) % workers.len()];
            let figure = worker.batch(request)?;
            figures
                .entry(worker.scenario.clone())
                .or_default()
                .push(figure);
        }
    }
    Ok(figures)
}

/// The median (NaN for no values).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-12);
        assert!(median(&[]).is_nan());
    }
}
