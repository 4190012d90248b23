// Renders an Ollama Modelfile TEMPLATE for a chat as Ollama does (its template/template.go: Execute after
// collate): every system message joined into .System and kept in .Messages, consecutive messages of one
// role merged. Reads {"template": ..., "messages": [{"role", "content"}]} on stdin, prints the prompt.
// Used by tests/test_gguf.py; Go's text/template is the engine Ollama's templates run on.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var input struct {
		Template string    `json:"template"`
		Messages []message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	var system []string
	var collated []*message
	for i := range input.Messages {
		m := input.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == m.Role {
			collated[len(collated)-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &m)
		}
	}
	values := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Prompt": "", "Response": ""}
	if err := template.Must(template.New("").Parse(input.Template)).Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
