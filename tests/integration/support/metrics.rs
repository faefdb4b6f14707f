//! Reading one figure off a Prometheus text page.

/// The value of the sample `name` whose labels are exactly `labels` (in any order), if the page
/// has it.
pub fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels
        .iter()
        .map(|(label, value)| format!("{label}=\"{value}\""))
        .collect();
    wanted.sort();
    page.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((series_name, rest)) => (series_name, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if series_name != name {
            return None;
        }
        let mut found: Vec<String> = series_labels
            .split(',')
            .filter(|label| !label.is_empty())
            .map(str::to_owned)
            .collect();
        found.sort();
        (found == wanted).then(|| value.parse().ok()).flatten()
    })
}
