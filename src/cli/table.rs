//! Plain-text tables for a terminal: a header, columns padded to their widest cell.

/// `rows` under `headers`, each column as wide as its widest cell, two spaces apart.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut text = line(headers.to_vec());
    for row in rows {
        text.push('\n');
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_every_column_to_its_widest_cell() {
        let rows = vec![
            vec!["a".to_owned(), "long cell".to_owned()],
            vec!["wider".to_owned(), "b".to_owned()],
        ];
        assert_eq!(
            render(&["H1", "H2"], &rows),
            "H1     H2\na      long cell\nwider  b"
        );
    }
}
