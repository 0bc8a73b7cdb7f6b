//! A metric vector whose series a request path uses, each resolved once per thread and kept.
//!
//! `with_label_values` hashes every label value with SipHash, takes the vector's lock and
//! clones the series, on every call. A thread that has used a series keeps its handle, found
//! again by its label values in a map of its own, without a lock; and a vector of vectors (a
//! request's count, duration and overhead) finds the series of all of them in one lookup.

use std::cell::RefCell;

use hashbrown::{Equivalent, HashMap};
use prometheus::core::{MetricVec, MetricVecBuilder};
use thread_local::ThreadLocal;

/// A metric vector: a series by its label values.
pub trait Vector {
    type Series: Send;
    fn series(&self, labels: &[&str]) -> Self::Series;
}

impl<T: MetricVecBuilder> Vector for MetricVec<T>
where
    T::M: Send,
{
    type Series = T::M;
    fn series(&self, labels: &[&str]) -> T::M {
        self.with_label_values(labels)
    }
}

/// The vector, and each thread's handles on its series. They are bounded as the vector's own
/// series are: by its labels' values.
pub struct Series<V: Vector> {
    vec: V,
    by_thread: ThreadLocal<RefCell<HashMap<Labels, V::Series>>>,
}

/// A series' label values, as a thread keeps them.
#[derive(Hash, PartialEq, Eq)]
struct Labels(Box<[Box<str>]>);

/// Label values looked up: they hash as the [`Labels`] they equal (each value as a `str`, after
/// their number).
#[derive(Hash)]
struct LabelsRef<'a>(&'a [&'a str]);

impl Equivalent<Labels> for LabelsRef<'_> {
    fn equivalent(&self, kept: &Labels) -> bool {
        self.0.len() == kept.0.len() && self.0.iter().zip(&kept.0).all(|(a, b)| *a == &**b)
    }
}

impl<V: Vector> Series<V> {
    pub fn new(vec: V) -> Self {
        Series {
            vec,
            by_thread: ThreadLocal::new(),
        }
    }

    /// `use_series` on the series of `labels`, in the vector's label order.
    pub fn with<R>(&self, labels: &[&str], use_series: impl FnOnce(&V::Series) -> R) -> R {
        let mut handles = self.by_thread.get_or_default().borrow_mut();
        let series = match handles.get(&LabelsRef(labels)) {
            Some(series) => series,
            None => {
                let kept = Labels(labels.iter().map(|&value| value.into()).collect());
                handles
                    .entry(kept)
                    .or_insert_with(|| self.vec.series(labels))
            }
        };
        use_series(series)
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{IntCounterVec, Opts};

    use super::Series;

    #[test]
    fn each_series_counts_what_its_labels_name_from_any_thread() {
        let vec = IntCounterVec::new(Opts::new("t", "t"), &["a", "b"]).unwrap();
        let series = Series::new(vec.clone());
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for _ in 0..2 {
                        series.with(&["x", "y"], |c| c.inc());
                        series.with(&["y", "x"], |c| c.inc());
                    }
                    series.with(&["x"; 2], |c| c.inc_by(10));
                });
            }
        });
        let count = |labels: &[&str]| vec.with_label_values(labels).get();
        assert_eq!(count(&["x", "y"]), 6);
        assert_eq!(count(&["y", "x"]), 6);
        assert_eq!(count(&["x", "x"]), 30);
    }
}
