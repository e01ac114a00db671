//! Order statistics of samples: every figure in BENCHMARKS.md is a percentile of one of these.

/// Samples, sorted once.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    sorted: Vec<f64>,
}

impl Samples {
    pub fn new(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self { sorted: values }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The nearest-rank percentile, `p` in 0..=1 (NaN when empty).
    pub fn percentile(&self, p: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        self.sorted[((self.sorted.len() - 1) as f64 * p).round() as usize]
    }

    pub fn median(&self) -> f64 {
        self.percentile(0.5)
    }

    pub fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(f64::NAN)
    }

    pub fn values(&self) -> &[f64] {
        &self.sorted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_sorted_values() {
        let s = Samples::new(vec![5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!((s.percentile(0.0), s.median(), s.max()), (1.0, 3.0, 5.0));
        assert_eq!(s.percentile(0.25), 2.0);
        assert!(Samples::new(vec![]).median().is_nan());
    }
}
